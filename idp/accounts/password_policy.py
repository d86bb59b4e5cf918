"""The password policy: which new passwords Darbaza refuses, and why.

A pure module (STYLE 4): no I/O, no Flask. Callers pass the account's login and names,
the school's context words and a blocklist (anything supporting ``in`` over casefolded
NFC strings, such as ``BlocklistSource`` from ``idp.accounts.blocklist``), and show each
returned ``PasswordProblem`` as a translated message with its reason (ASVS 6.2.12,
NIST 800-63B-4 §3.1.1.2: tell the user why a password was refused).

What is deliberately absent: composition rules (ASVS 6.2.5), truncation and case
folding of the stored password (ASVS 6.2.1/6.2.9). Case folding is used only to
*compare* against the login, names, context words and the blocklist."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Container, Iterable
from dataclasses import dataclass

# DESIGN "Credentials" / ASVS 6.2.1, NIST 800-63B-4 §3.1.1.2: 15 when the account can
# sign in with a password alone, 8 when a second factor is always asked; at most 128
# (ASVS 6.2.9 wants at least 64 to be allowed).
MIN_LENGTH_PASSWORD_ONLY = 15
MIN_LENGTH_WITH_SECOND_FACTOR = 8
MAX_LENGTH = 128

# Shorter tokens ("ali", "7a") occur inside too many good passphrases to refuse them.
MIN_TOKEN_LENGTH = 4

# Trailing digits, punctuation, symbols and spaces: "password123!" is "password" with
# the padding people add to satisfy old composition rules.
_TRAILING_PADDING = re.compile(r"[\W\d_]+$")
# Tokens are runs of letters and digits in any script.
_TOKEN_SPLIT = re.compile(r"[\W_]+")


@dataclass(frozen=True)
class PasswordProblem:
    """One reason a password is refused; ``limit`` or ``word`` feed the message."""

    code: str
    limit: int | None = None
    word: str | None = None


TOO_SHORT = "too_short"
TOO_LONG = "too_long"
CONTAINS_LOGIN = "contains_login"
CONTAINS_NAME = "contains_name"
CONTEXT_WORD = "context_word"
COMMON_PASSWORD = "common_password"


def minimum_length(*, has_second_factor: bool) -> int:
    """The shortest password allowed for an account (ASVS 6.2.1, NIST N1)."""
    return MIN_LENGTH_WITH_SECOND_FACTOR if has_second_factor else MIN_LENGTH_PASSWORD_ONLY


def fold(text: str) -> str:
    """The comparison form of a string: NFC, then casefolded (never stored)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold())


def tokens(text: str) -> list[str]:
    """The comparison tokens of a login, name or context word: the whole folded text
    without separators, and each run of letters and digits, kept when long enough."""
    folded = fold(text).strip()
    parts = [p for p in _TOKEN_SPLIT.split(folded) if p]
    candidates = ["".join(parts), *parts]
    seen: list[str] = []
    for candidate in candidates:
        if len(candidate) >= MIN_TOKEN_LENGTH and candidate not in seen:
            seen.append(candidate)
    return seen


def blocklist_candidates(password: str) -> list[str]:
    """The forms of a password looked up in the blocklist: the whole folded password
    and, when it ends in padding, the part before it."""
    folded = fold(password)
    candidates = [folded]
    stripped = _TRAILING_PADDING.sub("", folded)
    if stripped and stripped != folded:
        candidates.append(stripped)
    return candidates


def check_password(
    password: str,
    *,
    min_length: int,
    max_length: int = MAX_LENGTH,
    login: str,
    names: Iterable[str],
    context_words: Iterable[str],
    blocklist: Container[str],
) -> list[PasswordProblem]:
    """Every rule ``password`` breaks, in a stable order; empty when it is acceptable.

    Length is counted in code points after NFC (NIST 800-63B-4 §3.1.1.2), so a
    password typed decomposed on one keyboard and composed on another is the same."""
    normalised = unicodedata.normalize("NFC", password)
    problems: list[PasswordProblem] = []
    length = len(normalised)
    if length < min_length:
        problems.append(PasswordProblem(TOO_SHORT, limit=min_length))
    elif length > max_length:
        problems.append(PasswordProblem(TOO_LONG, limit=max_length))

    folded = fold(normalised)
    # Separators are ignored on both sides: "aigerim.asanova" is found in "Aigerim Asanova!".
    compact = "".join(p for p in _TOKEN_SPLIT.split(folded) if p)

    def found(token: str) -> bool:
        return token in folded or token in compact

    # ASVS 6.2.11 / NIST N5: context-specific words. The whole login is refused even
    # when short, since a password equal to it is guessed first.
    login_folded = fold(login).strip()
    if (login_folded and folded.strip() == login_folded) or any(found(t) for t in tokens(login)):
        problems.append(PasswordProblem(CONTAINS_LOGIN))
    if any(found(t) for name in names for t in tokens(name)):
        problems.append(PasswordProblem(CONTAINS_NAME))
    reported: set[str] = set()
    for word in context_words:
        for token in tokens(word):
            if token not in reported and found(token):
                reported.add(token)
                problems.append(PasswordProblem(CONTEXT_WORD, word=token))

    # ASVS 6.2.4 / NIST N4: commonly used and breached passwords.
    if any(candidate in blocklist for candidate in blocklist_candidates(normalised)):
        problems.append(PasswordProblem(COMMON_PASSWORD))
    return problems


def context_words_from(setting: Iterable[str], school_name: str) -> list[str]:
    """The context words of this deployment: the configured list plus the words of
    the school's name (each long enough to matter)."""
    words = [w for w in setting if w.strip()]
    words.extend(p for p in _TOKEN_SPLIT.split(school_name) if len(p) >= MIN_TOKEN_LENGTH)
    return words
