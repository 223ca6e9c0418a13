"""The user tools' client of the controller's JSON API (`marco`, `marco-inventory`, the
Ansible inventory plugin): one request, its answer as JSON or as the typed error it carries."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from .agent_api import DEFAULT_TIMEOUT
from .credentials import controller_context
from .errors import AgentUnreachable, ProtocolError, error_from_answer
from .tokens import bearer_header

REFUSED_TOKEN_HINT = "log in again: marco login"


def call_controller(url: str, path: str, token: str | None = None, body: Any = None,
                    ca: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """POST `body` as JSON (GET without one) to `url` + `path` and return the JSON answer.

    An error answer raises its typed error, its message naming the controller and the status;
    a refused token says to log in again; a controller out of reach is AgentUnreachable."""
    url = url.rstrip("/")
    headers = bearer_header(token)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout,
                                    context=controller_context(url, ca)) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as answer:
        error = error_from_answer(answer.code, answer.read())
        hint = error.hint or (REFUSED_TOKEN_HINT if answer.code == 401 and token else None)
        raise type(error)(f"{url} answered {answer.code}: {error.message}", hint) from None
    except (urllib.error.URLError, OSError) as failure:
        raise AgentUnreachable(f"cannot reach the controller at {url}: "
                               f"{getattr(failure, 'reason', failure)}") from None
    except ValueError:
        raise ProtocolError(f"{url} answered something that is not JSON") from None
