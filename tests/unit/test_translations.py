"""The message catalogs are complete: every string of the provider is in messages.pot, and
every message of messages.pot is translated into Kyrgyz and Russian (English too).

When a test here fails after you added or changed a string, run ``make extract-messages``
(pybabel extract + update), translate the new entries in
idp/translations/{ky,ru,en}/LC_MESSAGES/messages.po (en: msgstr = msgid) and run
``make translations``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog
from babel.messages.extract import DEFAULT_KEYWORDS, extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.pofile import read_po

ROOT = Path(__file__).resolve().parents[2]
TRANSLATIONS = ROOT / "idp" / "translations"
POT = TRANSLATIONS / "messages.pot"
# The directories `make extract-messages` scans (keep in step with the Makefile).
SOURCE_DIRS = ("idp", "admin_ui", "examples")
# `_l` is flask_babel.lazy_gettext (pybabel extract -k _l).
KEYWORDS = {**DEFAULT_KEYWORDS, "_l": None}
PLACEHOLDER = re.compile(r"%\((\w+)\)[sdrif]")

HOW_TO_FIX = (
    "run `make extract-messages`, translate the new entries in "
    "idp/translations/{ky,ru,en}/LC_MESSAGES/messages.po, then `make translations`"
)


def _read(path: Path, locale: str | None = None) -> Catalog:
    with path.open("rb") as f:
        return read_po(f, locale=locale)


def _msgids(catalog: Catalog) -> list[str | tuple[str, ...]]:
    return [m.id for m in catalog if m.id]


def _strings(value: str | tuple[str, ...] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [v for v in value if v is not None]


def _placeholders(value: str | tuple[str, ...] | None) -> list[list[str]]:
    return [sorted(PLACEHOLDER.findall(s)) for s in _strings(value)]


def _show(msgid: str | tuple[str, ...]) -> str:
    return repr(msgid if isinstance(msgid, str) else msgid[0])


def test_template_exists_and_is_not_empty() -> None:
    assert POT.is_file(), f"{POT} is missing: {HOW_TO_FIX}"
    assert _msgids(_read(POT)), f"{POT} has no messages: {HOW_TO_FIX}"


@pytest.mark.parametrize("lang", ["ky", "ru"])
def test_every_message_is_translated(lang: str) -> None:
    pot = _read(POT)
    catalog = _read(TRANSLATIONS / lang / "LC_MESSAGES" / "messages.po", lang)
    problems: list[str] = []
    for template in pot:
        if not template.id:
            continue
        message = catalog.get(template.id, template.context)
        if message is None:
            problems.append(f"missing: {_show(template.id)}")
        elif message.fuzzy:
            problems.append(f"fuzzy: {_show(template.id)}")
        elif not _strings(message.string) or not all(s.strip() for s in _strings(message.string)):
            problems.append(f"untranslated: {_show(template.id)}")
    assert not problems, (
        f"{lang}: {len(problems)} message(s) need a translation ({HOW_TO_FIX}):\n  "
        + "\n  ".join(problems)
    )


@pytest.mark.parametrize("lang", ["ky", "ru", "en"])
def test_placeholders_match(lang: str) -> None:
    catalog = _read(TRANSLATIONS / lang / "LC_MESSAGES" / "messages.po", lang)
    problems: list[str] = []
    for message in catalog:
        if not message.id or not _strings(message.string) or not any(_strings(message.string)):
            continue
        expected = _placeholders(message.id)[0]
        for got in _placeholders(message.string):
            if got != expected:
                problems.append(f"{_show(message.id)}: expected {expected}, translation has {got}")
    assert not problems, f"{lang}: placeholders differ from the msgid:\n  " + "\n  ".join(problems)


def test_english_catalog_is_up_to_date() -> None:
    """English is the source language; its catalog must still list every message, with no
    fuzzy entries (a fuzzy entry is skipped when compiling)."""
    pot = _read(POT)
    catalog = _read(TRANSLATIONS / "en" / "LC_MESSAGES" / "messages.po", "en")
    problems = []
    for template in pot:
        if not template.id:
            continue
        message = catalog.get(template.id, template.context)
        if message is None:
            problems.append(f"missing: {_show(template.id)}")
        elif message.fuzzy:
            problems.append(f"fuzzy: {_show(template.id)}")
    assert not problems, f"en: ({HOW_TO_FIX}):\n  " + "\n  ".join(problems)


def test_every_source_string_is_in_the_template() -> None:
    with (ROOT / "babel.cfg").open(encoding="utf-8") as f:
        method_map, options_map = parse_mapping_cfg(f, "babel.cfg")
    pot = _read(POT)
    extracted = 0
    missing: list[str] = []
    for name in SOURCE_DIRS:
        directory = ROOT / name
        if not directory.is_dir():
            continue
        for filename, lineno, message, _comments, context in extract_from_dir(
            str(directory), method_map, options_map, keywords=KEYWORDS
        ):
            extracted += 1
            # Catalog.get keys plural messages by their singular and takes the context.
            if pot.get(message, context) is None:
                missing.append(f"{name}/{filename}:{lineno}: {message!r}")
    assert extracted, "no translatable strings were extracted: check babel.cfg and SOURCE_DIRS"
    assert not missing, (
        f"{len(missing)} string(s) in the source are not in messages.pot ({HOW_TO_FIX}):\n  "
        + "\n  ".join(missing)
    )
