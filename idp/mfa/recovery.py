"""Recovery (look-up) codes, pure: generation, display form and normalisation.

Ten codes of ten characters from Crockford's base32 alphabet (no I, L, O or U, so
nothing is mistaken for another character): 50 bits each from the CSPRNG (ASVS 6.5.3,
6.5.4 asks for at least 20). They are stored argon2id-hashed with a random salt
(ASVS 6.5.2), each usable once."""

from __future__ import annotations

import secrets

ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
CODE_LENGTH = 10
CODE_COUNT = 10
# What people type for the characters the alphabet leaves out (Crockford's decoding).
_LOOKALIKES = str.maketrans({"o": "0", "i": "1", "l": "1"})


def new_codes(count: int = CODE_COUNT) -> list[str]:
    """``count`` fresh codes in their normal (stored) form."""
    return ["".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH)) for _ in range(count)]


def display(code: str) -> str:
    """The code as shown to the person: two groups of five, ``abcde-fghjk``."""
    half = CODE_LENGTH // 2
    return f"{code[:half]}-{code[half:]}"


def normalise(text: str) -> str | None:
    """The normal form of a typed code (case, spaces, dashes and look-alikes ignored),
    or None when it cannot be a recovery code."""
    compact = "".join(ch for ch in text.casefold() if ch not in " -\t").translate(_LOOKALIKES)
    if len(compact) != CODE_LENGTH or any(ch not in ALPHABET for ch in compact):
        return None
    return compact
