"""Tokens the tests forge: expired, of another salt, tampered, and the other spellings of a
valid one."""

from __future__ import annotations

import time

from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from marco.tokens import TOKEN_SALT

BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


class _PastSigner(TimestampSigner):
    """Signs with a timestamp 13 hours old, to make expired tokens."""

    def get_timestamp(self) -> int:
        return int(time.time()) - 13 * 3600


def expired_token(secret: bytes, username: str) -> str:
    return URLSafeTimedSerializer(secret, salt=TOKEN_SALT, signer=_PastSigner).dumps(username)


def wrong_salt_token(secret: bytes, username: str) -> str:
    return URLSafeTimedSerializer(secret, salt="marco-other-purpose").dumps(username)


def tampered_token(token: str) -> str:
    payload, _, rest = token.partition(".")
    return payload[:-1] + ("A" if payload[-1] != "A" else "B") + "." + rest


def equivalent_spellings(token: str) -> list[str]:
    """Every other spelling of `token` that decodes to the same parts: the last character of
    an unpadded base64 part carries bits the decoder ignores."""
    from itsdangerous.encoding import base64_decode
    from itsdangerous.exc import BadData
    parts = token.split(".")
    spellings = []
    for index, part in enumerate(parts):
        decoded = base64_decode(part)
        for char in BASE64URL:
            other = part[:-1] + char
            try:
                same = other != part and base64_decode(other) == decoded
            except BadData:
                same = False
            if same:
                spellings.append(".".join(parts[:index] + [other] + parts[index + 1:]))
    return spellings
