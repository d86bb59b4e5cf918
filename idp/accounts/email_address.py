"""E-mail addresses people give for their own account: a conservative syntax check.

The ``email-validator`` package is not a dependency, so this accepts the plain
``local@domain.tld`` form only (RFC 5321 dot-atom local part, LDH domain labels with
an alphabetic or ``xn--`` top-level label, at most 320 characters) and refuses the rest
(quoted local parts, IP literals, comments, non-ASCII). Whether the address works is
proved by the link mailed to it, not here. Every accepted address also passes the
outbox's own recipient check (idp/notify/outbox.py)."""

from __future__ import annotations

import re

MAX_LENGTH = 320
MAX_LOCAL_LENGTH = 64
MAX_DOMAIN_LENGTH = 255

_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_TOP_LABEL = re.compile(r"[A-Za-z]{2,63}|xn--[A-Za-z0-9-]{1,59}")


def normalise_email(value: str | None) -> str | None:
    """The address with surrounding blanks removed and the domain in lower case, or
    None when it is not a plain address this service will send mail to."""
    if value is None:
        return None
    address = value.strip()
    if not address or len(address) > MAX_LENGTH or not address.isascii() or address.count("@") != 1:
        return None
    local, domain = address.split("@")
    if not (1 <= len(local) <= MAX_LOCAL_LENGTH) or not _LOCAL.fullmatch(local):
        return None
    domain = domain.lower()
    if not (1 <= len(domain) <= MAX_DOMAIN_LENGTH):
        return None
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    if not _TOP_LABEL.fullmatch(labels[-1]):
        return None
    return f"{local}@{domain}"


def same_address(a: str | None, b: str | None) -> bool:
    """Whether two stored addresses name the same mailbox (compared case-insensitively:
    a local part that differs only in case reaches the same person everywhere in practice)."""
    return bool(a) and bool(b) and a.strip().casefold() == b.strip().casefold()  # type: ignore[union-attr]


def mask_email(address: str) -> str:
    """``a***@example.org``: enough for the owner to recognise it, little for anyone else."""
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}" if domain else "***"
