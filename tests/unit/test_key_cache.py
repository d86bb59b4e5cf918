"""The signing-key cache: a reload that finds the same keys keeps the imported key
objects (importing an RSA private key costs tens of milliseconds, and every process
reloads every IDP_KEY_CACHE_SECONDS); a rotation is picked up; a kid nobody knows forces
a reload so that a rotation made by another process is seen at once."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import idp.models  # noqa: F401 - every table on the metadata
from idp.crypto import SecretBox
from idp.db import Base
from idp.oidc.keys import KeyService


def _service(factory, cache_seconds: int) -> KeyService:  # type: ignore[no-untyped-def]
    return KeyService(session_factory=factory, box=SecretBox("unit-test-key", "signing-keys"), retire_after=3600,
                      cache_seconds=cache_seconds)


def test_reloads_keep_the_imported_key_and_rotations_are_seen(tmp_path: Path):
    engine = create_engine(f"sqlite:///{tmp_path / 'keys.sqlite3'}")
    Base.metadata.create_all(engine)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    writer, reader = _service(factory, 0), _service(factory, 0)  # two processes, no cache time
    with factory.begin() as session:
        writer.ensure_key(session)
    first = reader.signing_key()
    assert reader.signing_key() is first  # reloaded (cache 0 s), same key: the same object
    with factory.begin() as session:
        new_kid = writer.rotate(session)[0].kid
    assert reader.signing_key() is not first and reader.signing_key().kid == new_kid
    # A cached reader (a day) learns of another process's rotation from an unknown kid.
    cached = _service(factory, 86400)
    old_kid = cached.signing_key().kid
    with factory.begin() as session:
        newest = writer.rotate(session)[0].kid
    assert cached.signing_key().kid == old_kid  # still cached
    assert (found := cached.public_key(newest)) is not None and found.kid == newest
    assert cached.signing_key().kid == newest
    engine.dispose()
