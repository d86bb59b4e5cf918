"""The password policy (idp/accounts/password_policy.py) and its blocklist sources."""

from __future__ import annotations

import gzip
import unicodedata
from pathlib import Path

import pytest

from idp.accounts.blocklist import (
    BlocklistUnavailable,
    FileBlocklist,
    NullBlocklist,
    build_blocklist,
)
from idp.accounts.password_policy import (
    COMMON_PASSWORD,
    CONTAINS_LOGIN,
    CONTAINS_NAME,
    CONTEXT_WORD,
    TOO_LONG,
    TOO_SHORT,
    PasswordProblem,
    check_password,
    context_words_from,
    minimum_length,
)
from idp.accounts.passwords import PasswordHashing
from idp.config import Settings

BLOCKLIST = frozenset({"password", "qwertyuiop", "password1234", "iloveyou", "123456789012345"})
CONTEXT = context_words_from(Settings().password_context_words, "Demo School No. 1")


def problems(password: str, *, min_length: int = 15, login: str = "pupil-7", names: tuple[str, ...] = (),
             context: list[str] | None = None, blocklist: frozenset[str] = BLOCKLIST) -> list[PasswordProblem]:
    return check_password(password, min_length=min_length, login=login, names=names,
                          context_words=CONTEXT if context is None else context, blocklist=blocklist)


def codes(password: str, **kw: object) -> list[str]:
    return [p.code for p in problems(password, **kw)]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("length", "min_length", "expected"),
    [
        (7, 8, [PasswordProblem(TOO_SHORT, limit=8)]),
        (8, 8, []),
        (14, 8, []),
        (14, 15, [PasswordProblem(TOO_SHORT, limit=15)]),
        (15, 15, []),
        (64, 15, []),
        (128, 15, []),
        (129, 15, [PasswordProblem(TOO_LONG, limit=128)]),
        (129, 8, [PasswordProblem(TOO_LONG, limit=128)]),
    ],
)
def test_length_limits(length: int, min_length: int, expected: list[PasswordProblem]) -> None:
    # Varied letters, none of them a context word, login or common password.
    password = ("tqvbzkwjxmfhgnrd" * 9)[:length]
    assert problems(password, min_length=min_length) == expected


def test_minimum_length_depends_on_a_second_factor() -> None:
    assert minimum_length(has_second_factor=False) == 15
    assert minimum_length(has_second_factor=True) == 8


def test_length_is_counted_in_code_points_after_nfc() -> None:
    composed = "й" * 15
    decomposed = "и\u0306" * 15
    assert len(decomposed) == 30
    assert problems(composed) == problems(decomposed) == []
    # 28 code points as typed, 14 after NFC: too short either way.
    assert problems("и\u0306" * 14) == problems("й" * 14) == [PasswordProblem(TOO_SHORT, limit=15)]


def test_nfc_and_nfd_forms_give_the_same_result_everywhere() -> None:
    for password in ("Ålesund fjord walk!", "Дарбаза мектеп ачкычы", "öğretmen kapısı açık", "password1234"):
        nfd = unicodedata.normalize("NFD", password)
        assert problems(nfd, names=("Öykü",)) == problems(password, names=("Öykü",))


def test_emoji_count_as_one_character_each() -> None:
    assert problems("🐎" * 14 + "a") == []
    assert problems("🐎" * 14) == [PasswordProblem(TOO_SHORT, limit=15)]


def test_passphrase_without_composition_is_accepted() -> None:
    assert problems("correct horse battery staple") == []
    # No digits, no capitals, no symbols required.
    assert problems("abricot lampe rivière montagne") == []


@pytest.mark.parametrize(
    ("password", "word"),
    [
        ("Darbaza2025 is my gate", "darbaza"),
        ("дарбаза менин эшигим", "дарбаза"),
        ("my MEKTEP is number one", "mektep"),
        ("мектептеги күндөр жакшы", "мектеп"),
        ("the best School in Bishkek", "school"),
        ("portal access forever!", "portal"),
        ("менин сырсөзүм ушул эле", "сырсөз"),
        ("мой пароль очень длинный", "пароль"),
        ("welcome to demo land 2025", "demo"),
    ],
)
def test_context_words_are_refused_with_the_word(password: str, word: str) -> None:
    assert PasswordProblem(CONTEXT_WORD, word=word) in problems(password)


def test_context_words_come_from_the_setting() -> None:
    assert problems("quokka quokka sunshine", context=["quokka"]) == [PasswordProblem(CONTEXT_WORD, word="quokka")]
    assert problems("the best school in bishkek", context=[]) == []


def test_the_login_and_its_parts_are_refused_in_any_case() -> None:
    assert CONTAINS_LOGIN in codes("Aigerim2025!longer", login="aigerim")
    assert CONTAINS_LOGIN in codes("ASANOVA loves the mountains", login="aigerim.asanova")
    assert CONTAINS_LOGIN in codes("xx aigerim asanova xx", login="aigerim.asanova")
    # A short login (under 4 characters) is refused only as the whole password.
    assert codes("the cat sat on the mat", login="at") == []


def test_the_users_names_are_refused() -> None:
    assert codes("Aigerim2025! and more", login="pupil-7", names=("Aigerim Asanova",)) == [CONTAINS_NAME]
    assert codes("жумабаева асель 2010 жыл", names=("Асель Жумабаева",)) == [CONTAINS_NAME]
    assert codes("mountain river apricot", names=("Aigerim Asanova",)) == []


@pytest.mark.parametrize("password", ["password", "PASSWORD", "password1234", "Password123!", "qwertyuiop!!!!!",
                                      "iloveyou 2024", "123456789012345"])
def test_blocklisted_passwords_are_refused(password: str) -> None:
    assert COMMON_PASSWORD in codes(password, context=[])


def test_blocklist_is_matched_as_a_whole_not_by_containment() -> None:
    assert COMMON_PASSWORD not in codes("my password is long enough", context=[])


def test_several_reasons_are_all_reported() -> None:
    assert codes("Password1!", login="pupil-7") == [TOO_SHORT, CONTEXT_WORD, COMMON_PASSWORD]


def test_the_password_is_never_truncated_when_hashed() -> None:
    hashing = PasswordHashing(time_cost=1, memory_cost=8192, parallelism=1)
    long_password = "abcdefghij" * 10
    stored = hashing.hash(long_password)
    assert hashing.verify(stored, long_password)
    assert not hashing.verify(stored, long_password[:99])
    assert not hashing.verify(stored, long_password.upper())


def test_file_blocklist_loads_once_casefolded_and_nfc(tmp_path: Path) -> None:
    path = tmp_path / "list.txt.gz"
    lines = [f"pw{i:06d}" for i in range(100_000)] + ["PassWord", unicodedata.normalize("NFD", "Пароль-Ё")]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    blocklist = FileBlocklist(path)
    assert "password" in blocklist and "пароль-ё" in blocklist and "pw000042" in blocklist
    assert "PassWord" not in blocklist  # callers look up the folded form
    assert len(blocklist) == 100_002
    assert blocklist.entries is blocklist.entries


def test_a_short_or_missing_blocklist_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("password\n123456\n", encoding="utf-8")
    with pytest.raises(BlocklistUnavailable):
        _ = "x" in FileBlocklist(short)
    with pytest.raises(BlocklistUnavailable):
        build_blocklist("builtin", tmp_path / "missing.txt.gz")


def test_null_blocklist_knows_no_password() -> None:
    assert isinstance(build_blocklist("none", "/nonexistent"), NullBlocklist)
    assert problems("password1234", context=[], blocklist=NullBlocklist()) == [  # type: ignore[arg-type]
        PasswordProblem(TOO_SHORT, limit=15)
    ]


def test_shipped_blocklist_has_100k_common_passwords() -> None:
    path = Path(__file__).resolve().parents[2] / Settings().password_blocklist_file
    blocklist = build_blocklist("builtin", path)
    assert len(blocklist) >= 100_000  # type: ignore[arg-type]
    for common in ("password1234", "123456789", "iloveyou", "qwertyuiop"):
        assert common in blocklist
    assert "correct horse battery staple" not in blocklist
