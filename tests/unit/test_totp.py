"""The pure TOTP module (idp/mfa/totp.py) and recovery codes (idp/mfa/recovery.py)."""

from __future__ import annotations

import base64
import math
from urllib.parse import parse_qs, unquote, urlsplit

import pyotp
import pytest

from idp.mfa import recovery, totp

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
NOW = 1_800_000_015.0  # inside a step, 15 s after its start
STEP = int(NOW // 30)


def code(step: int) -> str:
    return pyotp.TOTP(SECRET).at(step * 30)


def test_secret_is_160_bits_of_base32_and_fresh_each_time():
    secrets = {totp.new_secret() for _ in range(50)}
    assert len(secrets) == 50
    for secret in secrets:
        assert len(secret) == 32 and len(base64.b32decode(secret)) * 8 == 160  # N15: >= 112


def test_provisioning_uri_names_the_issuer_and_the_login():
    uri = totp.provisioning_uri(SECRET, account="aigerim", school_name="School No. 5")
    parts = urlsplit(uri)
    assert parts.scheme == "otpauth" and parts.netloc == "totp"
    assert unquote(parts.path) == "/Darbaza — School No. 5:aigerim"
    query = parse_qs(parts.query)
    assert query["secret"] == [SECRET] and query["issuer"] == ["Darbaza — School No. 5"]


def test_a_colon_in_the_school_name_cannot_split_the_label():
    assert ":" not in totp.issuer_name("A: B")


def test_secret_is_shown_in_groups_of_four():
    assert totp.grouped_secret("ABCDEFGHIJ") == "ABCD EFGH IJ"


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_one_step_of_drift_each_way_is_accepted(offset):
    assert totp.verify(SECRET, code(STEP + offset), NOW, None) == STEP + offset


@pytest.mark.parametrize("offset", [-2, 2, -10])
def test_two_steps_away_is_refused(offset):
    # ASVS 6.5.5: a code from step t-2 is refused.
    assert totp.verify(SECRET, code(STEP + offset), NOW, None) is None


def test_the_same_code_twice_is_refused():
    first = totp.verify(SECRET, code(STEP), NOW, None)
    assert first == STEP
    assert totp.verify(SECRET, code(STEP), NOW + 1, last_used_step=first) is None


def test_an_older_step_than_the_last_used_one_is_refused_but_a_newer_one_works():
    assert totp.verify(SECRET, code(STEP - 1), NOW, last_used_step=STEP) is None
    assert totp.verify(SECRET, code(STEP + 1), NOW, last_used_step=STEP) == STEP + 1


@pytest.mark.parametrize("bad", ["", "12345", "1234567", "12a456", "abcdef", "١٢٣٤٥٦", "12345\x00", "-12345"])
def test_non_digits_and_wrong_lengths_are_refused(bad):
    assert totp.normalise_code(bad) is None
    assert totp.verify(SECRET, bad, NOW, None) is None


def test_spaces_inside_a_code_are_ignored():
    spaced = code(STEP)[:3] + " " + code(STEP)[3:]
    assert totp.verify(SECRET, spaced, NOW, None) == STEP


def test_step_boundaries():
    assert totp.step_at(0) == 0 and totp.step_at(29.999) == 0 and totp.step_at(30) == 1


def test_wrong_secret_is_refused():
    assert totp.verify(pyotp.random_base32(32), code(STEP), NOW, None) is None


def test_recovery_codes_have_at_least_50_bits_and_an_unambiguous_alphabet():
    codes = recovery.new_codes()
    assert len(codes) == 10 and len(set(codes)) == 10
    assert recovery.CODE_LENGTH * math.log2(len(recovery.ALPHABET)) >= 50  # ASVS 6.5.4: >= 20
    for c in codes:
        assert len(c) == 10 and set(c) <= set(recovery.ALPHABET)
    assert not set("ilou") & set(recovery.ALPHABET)


def test_recovery_code_normalisation():
    c = recovery.new_codes(1)[0]
    assert recovery.normalise(recovery.display(c)) == c
    assert recovery.normalise(" " + recovery.display(c).upper() + " ") == c
    assert recovery.normalise("oooooiiiii") == "0000011111"
    for bad in ("", "abc", "abcdefghjkm", "abcdefghj!", "123456"):
        assert recovery.normalise(bad) is None
