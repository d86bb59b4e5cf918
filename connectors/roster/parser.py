"""Reading a roster CSV file (the format is documented in README, "Roster import").

Columns (header line, any order, names case-insensitive): ``login``, ``display_name``,
``role`` (required); ``class``, ``email``, ``guardian_of``, ``locale`` (optional).
Several roles, classes or guardian_of logins are separated by ``|``. UTF-8 with or
without a BOM; ``;`` or ``,`` separated (decided by the header line)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

from idp.accounts.email_address import normalise_email
from idp.accounts.service import LOGIN_PATTERN, normalise_login

REQUIRED_COLUMNS = ("login", "display_name", "role")
OPTIONAL_COLUMNS = ("class", "email", "guardian_of", "locale")
MAX_FILE_BYTES = 5 * 1024 * 1024
MAX_ROWS = 20_000
MAX_LENGTHS = {"login": 64, "display_name": 255, "role": 500, "class": 500, "email": 320,
               "guardian_of": 2000, "locale": 2}
LOCALES = {"ky", "ru", "en"}


class RosterFileError(ValueError):
    """The file cannot be read as a roster at all (not UTF-8, no usable header, too big)."""


@dataclass(frozen=True)
class LineError:
    line: int
    reason: str
    login: str = ""


@dataclass
class RosterRow:
    line: int
    login: str
    display_name: str
    roles: list[str]
    classes: list[str] | None  # None: the column is absent (left as it is)
    email: str | None
    guardian_of: list[str] | None
    locale: str | None
    has_email: bool = True
    has_locale: bool = True


@dataclass
class ParsedRoster:
    columns: list[str]
    rows: list[RosterRow] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split("|") if part.strip()]


def _delimiter(header: str) -> str:
    return ";" if header.count(";") > header.count(",") else ","


def parse(data: bytes) -> ParsedRoster:
    if len(data) > MAX_FILE_BYTES:
        raise RosterFileError(f"the file is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RosterFileError("the file is not UTF-8 text") from exc
    # Only CR/LF end a line (str.splitlines would also split on U+2028 etc. inside a name).
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if not lines or not lines[0].strip():
        raise RosterFileError("the file has no header line")
    if "\x00" in lines[0]:
        raise RosterFileError("the header line contains a NUL character")
    delimiter = _delimiter(lines[0])
    columns = [c.strip().casefold() for c in next(csv.reader([lines[0]], delimiter=delimiter))]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    unknown = [c for c in columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if missing or unknown or len(set(columns)) != len(columns):
        raise RosterFileError(
            "the header must name the columns " + ", ".join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
            + (" (missing: " + ", ".join(missing) + ")" if missing else "")
            + (" (unknown: " + ", ".join(unknown) + ")" if unknown else "")
        )
    result = ParsedRoster(columns=columns)
    seen: dict[str, int] = {}
    # Physical line numbers: one record per line (quoted line breaks are not allowed in names).
    for number, raw in enumerate(lines[1:], start=2):
        if not raw.strip():
            continue
        if number > MAX_ROWS + 1:
            result.errors.append(LineError(number, f"more than {MAX_ROWS} lines"))
            break
        if "\x00" in raw:
            result.errors.append(LineError(number, "the line contains a NUL character"))
            continue
        try:
            values = next(csv.reader([raw], delimiter=delimiter))
        except csv.Error as exc:
            result.errors.append(LineError(number, f"the line cannot be read: {exc}"))
            continue
        if len(values) != len(columns):
            result.errors.append(LineError(number, f"expected {len(columns)} fields, found {len(values)}"))
            continue
        cells = {c: v.strip() for c, v in zip(columns, values, strict=True)}
        login = normalise_login(cells["login"])
        too_long = [c for c, v in cells.items() if len(v) > MAX_LENGTHS[c]]
        if too_long:
            result.errors.append(LineError(number, "too long: " + ", ".join(too_long), login[:64]))
            continue
        if not LOGIN_PATTERN.match(login):
            result.errors.append(LineError(number, f"bad login {login!r}", login))
            continue
        if login in seen:
            result.errors.append(LineError(number, f"duplicate login {login} (also on line {seen[login]})", login))
            continue
        seen[login] = number
        if not cells["display_name"]:
            result.errors.append(LineError(number, "display_name is empty", login))
            continue
        roles = _split(cells["role"])
        if not roles:
            result.errors.append(LineError(number, "role is empty", login))
            continue
        email: str | None = None
        if cells.get("email"):
            email = normalise_email(cells["email"])
            if email is None:
                result.errors.append(LineError(number, f"bad e-mail {cells['email']!r}", login))
                continue
        locale = cells.get("locale") or None
        if locale is not None and locale not in LOCALES:
            result.errors.append(LineError(number, "locale must be ky, ru or en", login))
            continue
        classes = [c.upper() for c in _split(cells["class"])] if "class" in cells else None
        guardian_of = [normalise_login(x) for x in _split(cells["guardian_of"])] if "guardian_of" in cells else None
        result.rows.append(RosterRow(
            line=number, login=login, display_name=cells["display_name"], roles=sorted(set(roles)),
            classes=sorted(set(classes)) if classes is not None else None, email=email,
            guardian_of=sorted(set(guardian_of)) if guardian_of is not None else None, locale=locale,
            has_email="email" in cells, has_locale="locale" in cells,
        ))
    return result
