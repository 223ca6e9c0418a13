"""The one exception ladder: every MarcoError subclass in the repository lives in marco.errors,
has a wire code of its own, and comes back as itself (message and hint) from an answer encoded
as the handlers encode it. Pure: no root, no network."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re

import pytest

from marco import errors
from marco.errors import (
    AuthenticationError,
    MarcoError,
    NotFound,
    ProtocolError,
    TokenExpired,
    error_from_answer,
    to_body,
    wire_errors,
)
from tests.support.paths import ROOT


def all_subclasses(cls: type[MarcoError]) -> set[type[MarcoError]]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= all_subclasses(sub)
    return found


def import_everything() -> None:
    """Import every module of the four packages (never a __main__), so that any MarcoError
    subclass defined anywhere exists."""
    pytest.importorskip("ansible")
    for package in ("marco", "agent", "controller", "ansible_plugins.core"):
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, package + "."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)


def test_every_error_class_lives_in_the_ladder_and_is_registered() -> None:
    import_everything()
    classes = all_subclasses(MarcoError) | {MarcoError}
    strays = [c for c in classes if c.__module__ != "marco.errors" and
              not c.__module__.startswith("tests.")]
    assert not strays, f"define these in marco/errors.py: {strays}"
    assert {c for c in classes if c.__module__ == "marco.errors"} == set(wire_errors().values())


WIRE_ERRORS = sorted(wire_errors().values(), key=lambda c: c.code)


@pytest.mark.parametrize("cls", WIRE_ERRORS, ids=[c.code for c in WIRE_ERRORS])
@pytest.mark.parametrize("hint", [None, "do this"])
def test_each_error_round_trips(cls: type[MarcoError], hint: str | None) -> None:
    sent = cls("it went wrong", hint=hint)
    body = json.dumps(to_body(sent)).encode()  # what JsonApiMixin.write_error answers
    back = error_from_answer(sent.status, body)
    assert type(back) is cls
    assert (back.message, back.hint, back.status, back.code) == \
        ("it went wrong", hint, cls.status, cls.code)
    assert str(back) == str(sent)


def test_the_documented_codes_are_registered() -> None:
    table = (ROOT / "docs" / "protocol.md").read_text().split("## Errors", 1)[1].split("\n## ")[0]
    codes = set(re.findall(r"`([a-z_]+)`", table)) - {"error", "message", "hint"}
    assert codes and codes <= set(wire_errors())


def test_answers_that_are_not_ours_fall_back_on_the_status() -> None:
    assert type(error_from_answer(404, b"<html>nope</html>")) is NotFound
    assert type(error_from_answer(401, b'{"error": "someday_new"}')) is AuthenticationError
    assert type(error_from_answer(418, b"teapot")) is ProtocolError
    assert error_from_answer(404, b"").message == "answered HTTP 404"


def test_a_class_without_a_code_of_its_own_is_refused() -> None:
    with pytest.raises(TypeError, match="wire code"):
        type("NoCode", (NotFound,), {})
    with pytest.raises(TypeError, match="NotFound"):
        type("SameCode", (MarcoError,), {"code": "not_found"})
    assert errors.error_class(404, "not_found") is NotFound


def test_the_hint_joins_the_message_for_people_only() -> None:
    error = TokenExpired("token expired", hint="log in again (marco login)")
    assert str(error) == "token expired; log in again (marco login)"
    assert to_body(error) == {"error": "token_expired", "message": "token expired",
                              "hint": "log in again (marco login)"}
    assert "hint" not in to_body(NotFound("gone"))


def test_ansible_decides_by_type_and_hint() -> None:
    pytest.importorskip("ansible")
    from ansible.errors import AnsibleAuthenticationFailure, AnsibleConnectionFailure

    from ansible_plugins.core.errors import LOGIN_HINT, to_ansible
    from marco.errors import AgentUnreachable
    local = to_ansible(AuthenticationError("no Marco token", hint="run `marco login`"), "n1", "x")
    refused = to_ansible(AuthenticationError("invalid token"), "n1", "x")
    expired = to_ansible(TokenExpired("token expired", hint="elsewhere"), "n1", "x")
    assert isinstance(local, AnsibleAuthenticationFailure)
    assert local.message.endswith("Marco agent n1: no Marco token; run `marco login`")
    assert refused.message.endswith(f"Marco agent n1 refused the token (invalid token); "
                                    f"{LOGIN_HINT}")
    assert expired.message.endswith(LOGIN_HINT)
    assert isinstance(to_ansible(AgentUnreachable("down"), "n1", "x"), AnsibleConnectionFailure)
