"""Talking to a controller as the tests' clients do: JSON calls with a token, and a browser's
login through the form."""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any

from tests.support.controller_process import ControllerProcess
from tests.support.users import UnixUser


def call(controller: ControllerProcess, method: str, path: str, body: Any = None,
         token: str | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn = controller.connection(timeout=60)
    all_headers = dict(headers or {})
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    conn.request(method, path, body=body, headers=all_headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, data


def login_cookie(controller: ControllerProcess, user: UnixUser) -> str:
    """Log in through the form as a browser would; return the Cookie header."""
    conn = controller.connection(timeout=30)
    conn.request("GET", "/login")
    response = conn.getresponse()
    response.read()
    found = re.search(r"_xsrf=([^;]+)", response.getheader("Set-Cookie") or "")
    assert found is not None, "no _xsrf cookie"
    xsrf = found.group(1)
    form = urllib.parse.urlencode({"_xsrf": xsrf, "username": user.name, "password": user.password})
    conn.request("POST", "/login", body=form, headers={
        "Content-Type": "application/x-www-form-urlencoded", "Cookie": f"_xsrf={xsrf}"})
    response = conn.getresponse()
    response.read()
    assert response.status == 302, response.status
    cookies = [c.split(";")[0] for c in response.headers.get_all("Set-Cookie") or []]
    login = [c for c in cookies if c.startswith("marco_token=")]
    assert login and "HttpOnly" in str(response.headers) and "SameSite=Strict" in str(response.headers)
    return "; ".join(login + [f"_xsrf={xsrf}"])
