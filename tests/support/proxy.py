"""A small real reverse proxy for tests: terminates TLS with the controller's own certificate,
re-encrypts to the controller from its own source address, and appends the client's address
to X-Forwarded-For, as a load balancer in HTTP mode does (haproxy `option forwardfor`)."""

from __future__ import annotations

import http.client
import http.server
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tests.support.controller_process import ControllerProcess

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-connection", "host", "content-length"}


class ForwardingProxy(http.server.ThreadingHTTPServer):
    """Listens on `bind`:any port; each request goes to `controller` on a new connection from
    `source` (the address the controller is told to trust)."""

    daemon_threads = True

    def __init__(self, controller: ControllerProcess, source: str, bind: str = "127.0.0.1") -> None:
        super().__init__((bind, 0), _Forward)
        assert controller.pki is not None and controller.ssl_context is not None
        self.controller, self.source = controller, source
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(controller.pki.controller_cert, controller.pki.controller_key)
        self.socket = context.wrap_socket(self.socket, server_side=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"https://{host!s}:{port}"


class _Forward(http.server.BaseHTTPRequestHandler):
    server: ForwardingProxy
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._forward()

    def do_POST(self) -> None:  # noqa: N802
        self._forward()

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {name: value for name, value in self.headers.items()
                   if name.lower() not in HOP_BY_HOP}
        chain = self.headers.get("X-Forwarded-For")
        client = self.client_address[0]
        headers["X-Forwarded-For"] = f"{chain}, {client}" if chain else client
        controller = self.server.controller
        conn = http.client.HTTPSConnection(controller.host, controller.port, timeout=30,
                                           context=controller.ssl_context,
                                           source_address=(self.server.source, 0))
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's name)
        pass  # the controller's access log says what the tests need


@contextmanager
def forwarding_proxy(controller: ControllerProcess, source: str) -> Iterator[ForwardingProxy]:
    """A running `ForwardingProxy` in a thread, shut down on exit."""
    proxy = ForwardingProxy(controller, source)
    thread = threading.Thread(target=proxy.serve_forever, name="forwarding-proxy", daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(timeout=10)
