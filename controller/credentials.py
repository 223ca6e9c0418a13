"""Where command-line tools find the user's token: explicit value, env, a file, or the one
`marco login` stored (0600 under the user's config dir)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from agent.errors import AuthenticationError


def stored_token_path(environ: Mapping[str, str] | None = None) -> Path:
    """~/.config/marco/token (or under $XDG_CONFIG_HOME)."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "marco" / "token"


def store_token(token: str, path: Path | None = None) -> Path:
    """Save a token readable by its owner only (directory 0700, file 0600), atomically."""
    path = path or stored_token_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)  # a leftover could carry looser permissions
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    os.replace(tmp, path)
    return path


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
                raise AuthenticationError(f"no token in {path}; run: marco login")
            return found
    found = read_token_file(stored_token_path(environ))
    if found is None:
        raise AuthenticationError("no Marco token: run `marco login` (or set MARCO_TOKEN)")
    return found
