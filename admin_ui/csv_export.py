"""CSV exports of the console: safe for spreadsheets and readable with Cyrillic."""

from __future__ import annotations

# OWASP "CSV injection": a cell starting with one of these is run as a formula by
# spreadsheet programs; a leading apostrophe makes it plain text.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# Spreadsheets of the region read a file as UTF-8 (Cyrillic names) only with a BOM.
BOM = "\ufeff"


def safe_cell(value: object) -> str:
    """A CSV cell that a spreadsheet shows as text, never runs as a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text
