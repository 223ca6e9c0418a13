"""User tokens and the cluster secret.

A token is ``URLSafeTimedSerializer(secret, salt="marco-user-token").dumps(username)``: the
controller issues it after a PAM login, agents verify it with ``max_age`` on every request. The
secret file holds one secret per line, readable by its owner only; the last line is the newest:
it signs, and every line verifies, so a secret can be rotated without logging everyone out
(`marco-agent init-secret --rotate`, then drop the old line after the token lifetime).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from itsdangerous import BadData, BadSignature, SignatureExpired, URLSafeTimedSerializer
from itsdangerous.encoding import base64_decode, base64_encode

from .errors import AuthenticationError, ConfigError, TokenExpired, TokenRevoked

TOKEN_SALT = "marco-user-token"
SERVICE_SALT = "marco-controller-service"  # the controller's own short-lived tokens
SERVICE_MAX_AGE = 300
DEFAULT_MAX_AGE = 12 * 3600
MIN_SECRET_BYTES = 32
DEFAULT_SECRET_FILE = "/etc/marco/secret"
LOG_IN_AGAIN = "log in again (marco login)"  # the hint of an expired or revoked token


SecretKeys = tuple[bytes, ...]  # oldest first; the last one signs


class TokenSigner:
    """Issues and verifies user tokens with one salt; the newest secret signs, all verify."""

    def __init__(self, secret: bytes | Sequence[bytes], max_age: int = DEFAULT_MAX_AGE,
                 salt: str = TOKEN_SALT) -> None:
        keys = [secret] if isinstance(secret, bytes) else list(secret)
        if not keys or any(len(key) < MIN_SECRET_BYTES for key in keys):
            raise ConfigError(f"every secret must be at least {MIN_SECRET_BYTES} bytes")
        self._serializer = URLSafeTimedSerializer(keys, salt=salt)
        self.max_age = max_age

    def issue(self, username: str) -> str:
        """Return a new signed, timestamped token for `username`."""
        return self._serializer.dumps(username)

    def expires_at(self, token: str) -> float:
        """When a valid token stops being valid (epoch seconds)."""
        _, issued = self._serializer.loads(token, max_age=self.max_age, return_timestamp=True)
        return float(issued.timestamp()) + self.max_age

    def verify(self, token: str | None,
               not_before: Callable[[str], float | None] | None = None,
               denied: Callable[[str], bool] | None = None) -> str:
        """Return the username a valid, unexpired, unrevoked token carries; raise by cause.
        `not_before` gives a user's "log out everywhere" time, `denied` says whether this
        (canonical) token was logged out on its own."""
        if not token:
            raise AuthenticationError("no token given")
        if not is_canonical(token):
            # Another spelling of a valid token would dodge deny lists keyed on its digest.
            raise AuthenticationError("invalid token")
        try:
            username, issued = self._serializer.loads(token, max_age=self.max_age,
                                                      return_timestamp=True)
        except SignatureExpired as exc:
            raise TokenExpired("token expired", hint=LOG_IN_AGAIN) from exc
        except BadSignature as exc:
            raise AuthenticationError("invalid token") from exc
        if not isinstance(username, str) or not username:
            raise AuthenticationError("invalid token")
        cutoff = not_before(username) if not_before is not None else None
        if cutoff is not None and issued.timestamp() < cutoff:
            raise TokenRevoked("token revoked (logged out everywhere)", hint=LOG_IN_AGAIN)
        if denied is not None and denied(token):
            raise TokenRevoked("token revoked (logged out)", hint=LOG_IN_AGAIN)
        return username


def is_canonical(token: str) -> bool:
    """Whether `token` is the one spelling of its decoded parts.

    Unpadded base64 leaves unused bits in the last character of each part, which the decoder
    ignores: without this check one signed token has several spellings that all verify.
    """
    body = token[1:] if token.startswith(".") else token  # a leading "." marks zlib
    parts = body.split(".")
    try:
        return all(base64_encode(base64_decode(part)).decode("ascii") == part
                   for part in parts)
    except (BadData, UnicodeError, ValueError):  # not base64 at all
        return False


def load_secret(path: str | os.PathLike[str]) -> SecretKeys:
    """Read the cluster secrets (one a line, newest last), refusing a missing file, a short
    secret, or a file other users could read."""
    path = Path(path)
    try:
        info = path.stat()
        data = path.read_bytes().strip()
    except FileNotFoundError:
        raise ConfigError(f"secret file {path} does not exist "
                          "(create one with: marco-agent init-secret --secret-file "
                          f"{path})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from None
    if info.st_mode & 0o077:
        raise ConfigError(f"secret file {path} is accessible to other users "
                          f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}")
    if info.st_uid not in (os.geteuid(), 0):
        raise ConfigError(f"secret file {path} belongs to uid {info.st_uid}, who could forge "
                          f"tokens for any user; it must belong to root or to this process")
    keys = tuple(line.strip() for line in data.splitlines() if line.strip())
    short = [len(key) for key in keys if len(key) < MIN_SECRET_BYTES]
    if not keys or short:
        raise ConfigError(f"secret file {path} holds a secret of {short[0] if short else 0} "
                          f"bytes; at least {MIN_SECRET_BYTES} are needed")
    return keys


def rotate_secret(path: str | os.PathLike[str]) -> Path:
    """Append a new secret to an existing secret file: it signs from now on, the old ones
    still verify until they are removed from the file."""
    path = Path(path)
    load_secret(path)  # refuse to extend a file that would not load
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    with os.fdopen(fd, "a") as handle:
        handle.write(secrets.token_urlsafe(48) + "\n")
    return path


def create_secret(path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write a fresh random secret to `path` with mode 0600 (parents created 0700)."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ConfigError(f"secret file {path} already exists "
                          "(use --force to replace it)") from None
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(secrets.token_urlsafe(48) + "\n")
    return path


HEALTH_PROOF_SALT = b"marco-health-proof"


def health_proof(key: bytes, nonce: str, node: str) -> str:
    """An agent's answer to a controller's challenge: only holders of the cluster secret can
    give it, so a machine that merely announces itself on the LAN cannot pose as a node."""
    message = HEALTH_PROOF_SALT + b"\0" + nonce.encode() + b"\0" + node.encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def verify_health_proof(keys: Sequence[bytes], nonce: str, node: str, proof: object) -> bool:
    """True when `proof` was made with one of `keys` for this nonce and node name."""
    if not isinstance(proof, str):
        return False
    return any(hmac.compare_digest(health_proof(key, nonce, node), proof) for key in keys)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), or None
    when the header is absent, of another scheme or empty."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def bearer_header(token: str | None) -> dict[str, str]:
    """The header that carries `token` (none without a token)."""
    return {"Authorization": f"Bearer {token}"} if token else {}
