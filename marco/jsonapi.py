"""JSON answers and typed-error translation for Tornado handlers (agent and controller alike).

A handler raises a `marco.errors.MarcoError`; this mixin turns it into its HTTP status and a
`{"error": code, "message": text, "hint": what to do}` body (`marco.errors.to_body`), logs it
as an ordinary outcome rather than a crash, and hides anything unexpected behind a generic 500
(the traceback goes to the log only).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import tornado.web

from .errors import MarcoError, to_body

log = logging.getLogger(__name__)


class JsonApiMixin(tornado.web.RequestHandler):
    """Mix into a RequestHandler: `write_json`, and errors answered as JSON."""

    #: named in the generic 500 message ("see the agent's log")
    service_name = "server"

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(error, MarcoError):
            status_code = error.status
        super().send_error(status_code, **kwargs)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None, None))[1]
        body: dict[str, str]
        if isinstance(error, MarcoError):
            body = to_body(error)
        elif isinstance(error, tornado.web.HTTPError):
            body = {"error": "http", "message": error.log_message or self._reason}
        else:
            body = {"error": "internal",
                    "message": f"internal error (see the {self.service_name}'s log)"}
        if status_code == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="marco"')
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, MarcoError):
            log.info("%s %s -> %s: %s", self.request.method, self.request.path,
                     value.status, value.message)
        else:
            super().log_exception(typ, value, tb)
