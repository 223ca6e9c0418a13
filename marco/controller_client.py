"""The user tools' client of the controller's JSON API (`marco`, `marco-inventory`, the
Ansible inventory plugin): one request, its answer as JSON or as the typed error it carries."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
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


class ControllerClient:
    """The controller's API as the `marco` CLI uses it: one method per call, each answer as
    JSON or the typed error it carries (`call_controller`)."""

    def __init__(self, url: str, token: str | None, ca: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.ca = ca
        self.timeout = timeout

    def call(self, path: str, body: Any = None, **query: object) -> Any:
        """One request; `query` arguments that are None are left out."""
        given = {key: value for key, value in query.items() if value is not None}
        if given:
            path += "?" + urllib.parse.urlencode(given)
        return call_controller(self.url, path, self.token, body=body, ca=self.ca,
                               timeout=self.timeout)

    def permalink(self, path: str) -> str:
        """An absolute URL for a path the controller answered (a run's `url`)."""
        return urllib.parse.urljoin(self.url + "/", path)

    def nodes(self) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = self.call("/api/nodes")["nodes"]
        return nodes

    def start_run(self, nodes: list[str], command: str, cwd: str | None = None,
                  label: str = "marco run", kind: str = "command") -> dict[str, Any]:
        """POST /api/run: the controller starts `command` on every node (tagged with a new run
        of `kind`); the answer has `results` per node and, on a controller with runs, `run`."""
        answer: dict[str, Any] = self.call("/api/run", body={
            "nodes": nodes, "command": command, "cwd": cwd, "label": label, "kind": kind})
        return answer

    def runs(self, kind: str | None = None, status: str | None = None, text: str | None = None,
             before: str | None = None, limit: int = 50) -> tuple[list[dict[str, Any]], bool]:
        """One page of the caller's runs, newest first, and whether there are more."""
        answer = self.call("/api/runs", kind=kind, status=status, q=text, before=before,
                           limit=limit)
        return answer["runs"], bool(answer.get("more"))

    def run(self, run_id: str, since: int | None = None,
            limit: int | None = None) -> dict[str, Any]:
        """One run with its events (only those after `since`, at most `limit`, when given);
        `more` says whether events after the last one given are waiting."""
        answer: dict[str, Any] = self.call(run_path(run_id), since=since, limit=limit)
        return answer

    def run_executions(self, run_id: str, host: str | None = None,
                       task: str | None = None) -> list[dict[str, Any]]:
        """The run's executions (stored and live), without their output, page by page while
        the controller says `more` (the next page starts after the stored ones given)."""
        executions: list[dict[str, Any]] = []
        while True:
            answer = self.call(run_path(run_id) + "/executions", host=host, task=task,
                               offset=len(executions) or None)
            executions += answer["executions"]
            if not answer.get("more") or not answer["executions"]:
                return executions

    def execution_output(self, run_id: str, execution_id: str, since: int = 0,
                         limit: int | None = None) -> dict[str, Any]:
        """One page of an execution's output lines from `since` on: `events`, `next` (the
        seq to ask from next time) and `end` (no line after `next` will ever come)."""
        answer: dict[str, Any] = self.call(run_path(run_id) + "/output",
                                           execution=execution_id, since=since, limit=limit)
        return answer


def run_path(run_id: str) -> str:
    """/api/runs/ID with the id quoted: a given id never reaches another path."""
    return "/api/runs/" + urllib.parse.quote(run_id, safe="")
