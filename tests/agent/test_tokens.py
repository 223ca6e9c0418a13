"""Tokens and the secret file: what is accepted, what is refused and why."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from itsdangerous import URLSafeTimedSerializer

from marco.errors import AuthenticationError, ConfigError, TokenExpired
from marco.tokens import TOKEN_SALT, TokenSigner, create_secret, load_secret
from tests.support.tokens import (
    equivalent_spellings,
    expired_token,
    tampered_token,
    wrong_salt_token,
)

SECRET = b"s" * 40


def test_round_trip_and_format() -> None:
    signer = TokenSigner(SECRET)
    token = signer.issue("alice")
    assert signer.verify(token) == "alice"
    # The format every part of Marco agrees on:
    assert URLSafeTimedSerializer(SECRET, salt=TOKEN_SALT).loads(token, max_age=60) == "alice"


@pytest.mark.parametrize("make", [
    lambda: TokenSigner(b"x" * 40).issue("alice"),            # forged: another secret
    lambda: tampered_token(TokenSigner(SECRET).issue("alice")),
    lambda: wrong_salt_token(SECRET, "alice"),
    lambda: "",
    lambda: "not.a.token",
    lambda: "0",                                              # not base64 at all
    lambda: "a.b",
])
def test_refused_tokens(make) -> None:
    with pytest.raises(AuthenticationError):
        TokenSigner(SECRET).verify(make())


def test_other_spellings_of_a_valid_token_are_refused() -> None:
    """One token, one spelling: deny lists key on it, so an equivalent spelling must not verify
    (it revived logged-out tokens)."""
    signer = TokenSigner(SECRET)
    for user in ("alice", "bob", "marcotest-alice", "x" * 31):
        token = signer.issue(user)
        spellings = equivalent_spellings(token)
        assert spellings, token  # each part ends in a character with unused bits
        assert signer.verify(token) == user
        for spelling in spellings:
            with pytest.raises(AuthenticationError, match="invalid token"):
                signer.verify(spelling)


def test_expired_token_has_its_own_error() -> None:
    with pytest.raises(TokenExpired, match="log in again"):
        TokenSigner(SECRET).verify(expired_token(SECRET, "alice"))
    # ... and a longer max_age accepts the same token.
    assert TokenSigner(SECRET, max_age=14 * 3600).verify(expired_token(SECRET, "alice")) == "alice"


def test_create_secret_is_private_and_not_overwritten(tmp_path: Path) -> None:
    path = create_secret(tmp_path / "etc" / "secret")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert len(load_secret(path)) == 1 and len(load_secret(path)[0]) >= 32
    with pytest.raises(ConfigError, match="already exists"):
        create_secret(path)
    before = path.read_bytes()
    create_secret(path, overwrite=True)
    assert path.read_bytes() != before


def test_secret_file_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_secret(tmp_path / "missing")
    short = tmp_path / "short"
    short.write_text("too short\n")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 32"):
        load_secret(short)
    public = tmp_path / "public"
    public.write_text("p" * 64)
    public.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_secret(public)


def test_secret_readable_by_a_group_or_owned_by_a_user_is_refused(tmp_path: Path) -> None:
    grouped = tmp_path / "grouped"
    grouped.write_text("g" * 64)
    grouped.chmod(0o640)
    with pytest.raises(ConfigError, match="other users"):
        load_secret(grouped)
    if os.geteuid() == 0:
        owned = tmp_path / "owned"
        owned.write_text("o" * 64)
        owned.chmod(0o600)
        os.chown(owned, 12345, 12345)
        with pytest.raises(ConfigError, match="forge"):
            load_secret(owned)


def test_rotation_newest_signs_all_verify(tmp_path: Path) -> None:
    from marco.tokens import rotate_secret
    path = create_secret(tmp_path / "secret")
    old_token = TokenSigner(load_secret(path)).issue("alice")
    rotate_secret(path)
    keys = load_secret(path)
    assert len(keys) == 2 and os.stat(path).st_mode & 0o777 == 0o600
    rotated = TokenSigner(keys)
    assert rotated.verify(old_token) == "alice"            # old tokens still work
    new_token = rotated.issue("alice")
    assert TokenSigner(keys[-1:]).verify(new_token) == "alice"  # signed by the newest
    with pytest.raises(AuthenticationError):
        TokenSigner(keys[:1]).verify(new_token)
    with pytest.raises(AuthenticationError):
        TokenSigner(keys[-1:]).verify(old_token)            # once the old line is gone


def test_health_proof_binds_secret_nonce_and_node() -> None:
    from marco.tokens import health_proof, verify_health_proof
    proof = health_proof(SECRET, "nonce-1", "n1")
    assert verify_health_proof([b"o" * 40, SECRET], "nonce-1", "n1", proof)
    assert not verify_health_proof([SECRET], "nonce-2", "n1", proof)
    assert not verify_health_proof([SECRET], "nonce-1", "n2", proof)
    assert not verify_health_proof([b"x" * 40], "nonce-1", "n1", proof)
    assert not verify_health_proof([SECRET], "nonce-1", "n1", None)
