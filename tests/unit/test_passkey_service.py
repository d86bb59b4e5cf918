"""The passkey service's own rules (idp/mfa/passkeys.py), with a real Redis: single-use
challenges bound to their purpose, the relying party taken from the issuer, names."""

from __future__ import annotations

import threading

import pytest
from redis import Redis

from idp.mfa.passkeys import (
    CHALLENGE_TTL,
    Challenge,
    ChallengeStore,
    PasskeyRejected,
    PasskeyService,
    clean_name,
)


@pytest.fixture
def redis(redis_url: str) -> Redis:
    return Redis.from_url(redis_url)


def test_a_challenge_is_taken_once_and_expires(redis: Redis) -> None:
    store = ChallengeStore(redis)
    handle = store.put(Challenge("passwordless", b"\x01" * 32, None, True))
    assert 0 < redis.ttl(store.key(handle)) <= CHALLENGE_TTL
    taken = store.take(handle, "passwordless")
    assert taken == Challenge("passwordless", b"\x01" * 32, None, True)
    assert store.take(handle, "passwordless") is None
    assert redis.exists(store.key(handle)) == 0


def test_a_challenge_for_another_purpose_is_refused_and_spent(redis: Redis) -> None:
    store = ChallengeStore(redis)
    handle = store.put(Challenge("register", b"\x02" * 32, 7, False))
    assert store.take(handle, "second-factor") is None
    assert store.take(handle, "register") is None
    for bogus in (None, "", "x" * 65, "never-issued"):
        assert store.take(bogus, "register") is None


def test_parallel_answers_to_one_challenge_cannot_both_take_it(redis: Redis) -> None:
    """Two requests of one session can both read the handle before either saves the
    session: GETDEL lets only one of them find the challenge."""
    store = ChallengeStore(redis)
    for _ in range(20):
        handle = store.put(Challenge("passwordless", b"\x03" * 32, None, True))
        barrier = threading.Barrier(8)
        results: list[Challenge | None] = []

        def take(handle: str = handle, barrier: threading.Barrier = barrier,
                 results: list[Challenge | None] = results) -> None:
            barrier.wait()
            results.append(store.take(handle, "passwordless"))

        threads = [threading.Thread(target=take) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(r is not None for r in results) == 1


def test_a_used_challenge_is_refused_before_anything_else_is_looked_at(redis: Redis) -> None:
    service = PasskeyService(redis=redis, issuer="https://id.school.example", rp_name="School")
    handle = service.challenges.put(Challenge("passwordless", b"\x04" * 32, None, True))
    service.challenges.take(handle, "passwordless")
    with pytest.raises(PasskeyRejected) as refused:
        service.authenticate(None, handle, {"rawId": "AAAA"}, user=None)  # type: ignore[arg-type]
    assert refused.value.reason == "challenge"


@pytest.mark.parametrize(
    ("issuer", "rp_id", "origin"),
    [
        ("https://id.school.example", "id.school.example", "https://id.school.example"),
        ("https://id.school.example/darbaza", "id.school.example", "https://id.school.example"),
        ("http://localhost:8000", "localhost", "http://localhost:8000"),
        ("https://ID.School.Example:8443", "id.school.example", "https://id.school.example:8443"),
        ("https://id.school.example:443/", "id.school.example", "https://id.school.example"),
        ("http://127.0.0.1:5000", "127.0.0.1", "http://127.0.0.1:5000"),
    ],
)
def test_the_relying_party_is_the_issuers_host_and_origin(redis: Redis, issuer: str, rp_id: str, origin: str) -> None:
    service = PasskeyService(redis=redis, issuer=issuer, rp_name="School")
    assert (service.rp_id, service.origin) == (rp_id, origin)


def test_an_issuer_without_a_host_is_refused(redis: Redis) -> None:
    with pytest.raises(ValueError):
        PasskeyService(redis=redis, issuer="/relative", rp_name="School")


@pytest.mark.parametrize(
    ("typed", "kept"),
    [
        ("  My\tphone\x00 ", "My phone"),
        ("Телефон Айгерим", "Телефон Айгерим"),
        ("\n\r ", ""),
        ("x" * 100, "x" * 64),
        (None, ""),
    ],
)
def test_names_are_cleaned(typed: str | None, kept: str) -> None:
    assert clean_name(typed) == kept


def test_a_discarded_challenge_cannot_be_answered(redis: Redis) -> None:
    store = ChallengeStore(redis)
    handle = store.put(Challenge("register", b"\x05" * 32, 3, False))
    store.discard(handle)
    store.discard(None)
    assert store.take(handle, "register") is None
