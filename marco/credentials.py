"""Where command-line tools find the user's credentials: the token (explicit value, env, a
file, or the one `marco login` stored, 0600 under the user's config dir) and the TLS files
(the cluster CA, the user's short-lived client certificate and key from `marco login`)."""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Mapping
from pathlib import Path

from marco.atomic import write_atomic
from marco.errors import AuthenticationError, ConfigError
from marco.tls import CA_FILE, CRL_FILE, DEFAULT_TLS_DIR, ClientTls, server_trust_context

CLIENT_CERT, CLIENT_KEY = "client.pem", "client.key"


def stored_token_path(environ: Mapping[str, str] | None = None) -> Path:
    """~/.config/marco/token (or under $XDG_CONFIG_HOME)."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "marco" / "token"


def _store(path: Path, text: str) -> Path:
    """Write a file readable by its owner only (directory 0700, file 0600), atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, text.encode(), 0o600)
    return path


def store_token(token: str, path: Path | None = None) -> Path:
    """Save a token readable by its owner only, atomically."""
    return _store(path or stored_token_path(), token + "\n")


def store_tls(certificate: str, key: bytes, ca: str, crl: str | None,
              environ: Mapping[str, str] | None = None) -> Path:
    """Save the login's client certificate and key, the CA and CRL next to the token."""
    base = stored_token_path(environ).parent
    _store(base / CLIENT_KEY, key.decode())
    _store(base / CLIENT_CERT, certificate)
    _store(base / CA_FILE, ca)
    if crl:
        _store(base / CRL_FILE, crl)
    return base / CLIENT_CERT


def forget_tls(environ: Mapping[str, str] | None = None) -> None:
    base = stored_token_path(environ).parent
    for name in (CLIENT_CERT, CLIENT_KEY):
        (base / name).unlink(missing_ok=True)


def find_ca(given: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The cluster CA: `given`, $MARCO_TLS_CA, the one `marco login` stored, or the node's
    /etc/marco/ca.pem (public, world-readable)."""
    environ = os.environ if environ is None else environ
    for candidate in (given, environ.get("MARCO_TLS_CA"),
                      str(stored_token_path(environ).parent / CA_FILE),
                      os.path.join(DEFAULT_TLS_DIR, CA_FILE)):
        if candidate and os.access(candidate, os.R_OK):
            return candidate
        if candidate and candidate in (given, environ.get("MARCO_TLS_CA")):
            raise ConfigError(f"cannot read the CA file {candidate}")
    return None


def find_client_tls(environ: Mapping[str, str] | None = None) -> ClientTls | None:
    """The user's TLS identity: $MARCO_CLIENT_CERT/$MARCO_CLIENT_KEY (+ $MARCO_TLS_CA,
    $MARCO_TLS_CRL), else the certificate `marco login` stored; None if there is none."""
    environ = os.environ if environ is None else environ
    base = stored_token_path(environ).parent
    cert = environ.get("MARCO_CLIENT_CERT") or str(base / CLIENT_CERT)
    key = environ.get("MARCO_CLIENT_KEY") or str(base / CLIENT_KEY)
    if not os.path.exists(cert):
        if environ.get("MARCO_CLIENT_CERT"):
            raise ConfigError(f"MARCO_CLIENT_CERT {cert} does not exist")
        return None
    ca = find_ca(None, environ)
    if ca is None:
        raise ConfigError("no cluster CA: set MARCO_TLS_CA or run marco login")
    crl = environ.get("MARCO_TLS_CRL") or str(base / CRL_FILE)
    return ClientTls(ca, cert, key, crl if os.path.exists(crl) else None)


def require_client_tls(environ: Mapping[str, str] | None = None) -> ClientTls:
    """Like `find_client_tls`, but no certificate is a clear error."""
    found = find_client_tls(environ)
    if found is None:
        raise AuthenticationError("no Marco client certificate",
                                  hint="run `marco login` (or set MARCO_CLIENT_CERT, "
                                       "MARCO_CLIENT_KEY and MARCO_TLS_CA)")
    return found


def node_tls(tls: bool, host: str, environ: Mapping[str, str] | None = None) -> ClientTls | None:
    """The TLS identity to reach a node with. Plain HTTP (an agent in --dev mode) is allowed
    only to a loopback address, whatever an inventory says: a token never crosses a network
    in clear."""
    if tls:
        return require_client_tls(environ)
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ConfigError(f"refusing plain HTTP to {host}: only agents on this machine may run "
                          "without TLS (--dev); set marco_tls / MARCO_TLS back to true")
    return None


def controller_context(url: str, ca: str | None = None,
                       environ: Mapping[str, str] | None = None) -> ssl.SSLContext | None:
    """For an https:// controller: a context trusting the cluster CA; None for http://."""
    if not url.startswith("https://"):
        return None
    found = find_ca(ca, environ)
    if found is None:
        raise ConfigError(f"to trust {url}, give its CA: --ca FILE or MARCO_TLS_CA "
                          "(the cluster's ca.pem, e.g. /etc/marco/ca.pem on any node)")
    return server_trust_context(found)


def read_token_file(path: str | os.PathLike[str]) -> str | None:
    try:
        return Path(path).expanduser().read_text().strip() or None
    except OSError:
        return None


def find_token(token: str | None = None, token_file: str | None = None,
               environ: Mapping[str, str] | None = None) -> str:
    """The first of: `token`, $MARCO_TOKEN, `token_file`, $MARCO_TOKEN_FILE, the stored token."""
    environ = os.environ if environ is None else environ
    for candidate in (token, environ.get("MARCO_TOKEN")):
        if candidate and candidate.strip():
            return candidate.strip()
    for path in (token_file, environ.get("MARCO_TOKEN_FILE")):
        if path:
            found = read_token_file(path)
            if found is None:
                raise AuthenticationError(f"no token in {path}", hint="run: marco login")
            return found
    found = read_token_file(stored_token_path(environ))
    if found is None:
        raise AuthenticationError("no Marco token", hint="run `marco login` (or set MARCO_TOKEN)")
    return found
