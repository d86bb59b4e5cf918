"""A label a person recognises a session by ("Chrome 126, Windows 10"), parsed from the
User-Agent with ua-parser (uap-python, the ua-parser project's maintained rules; the
rules ship in the ``ua-parser-builtins`` package and are updated by upgrading it)."""

from __future__ import annotations

from functools import lru_cache

from ua_parser import parse

MAX_UA = 512
# Families the rules use for "not recognised".
_UNKNOWN = {"", "Other", "Generic Smartphone", "Generic Feature Phone", "Spider"}


def _version(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


@lru_cache(maxsize=1024)
def describe_device(user_agent: str | None) -> str:
    """Browser and version, operating system and version, and the device model when the
    rules know it; "" when nothing is recognised."""
    text = (user_agent or "")[:MAX_UA]
    if not text.strip():
        return ""
    result = parse(text)
    parts: list[str] = []
    if result.user_agent and result.user_agent.family not in _UNKNOWN:
        parts.append(f"{result.user_agent.family} {_version(result.user_agent.major)}".strip())
    if result.os and result.os.family not in _UNKNOWN:
        parts.append(f"{result.os.family} {_version(result.os.major, result.os.minor)}".strip())
    if result.device and result.device.family not in _UNKNOWN and result.device.family not in parts:
        model = result.device.family
        if not any(model in p for p in parts):
            parts.append(model)
    return ", ".join(parts)[:128]
