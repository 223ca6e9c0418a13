"""Property-based fuzzing (hypothesis) of a real agent over mutual TLS: its HTTP API, its
WebSocket and its file path handling. Each property runs at least 1,000 generated cases and
counts them; the invariants: the agent never crashes (no 5xx, still healthy), no forged token
is ever accepted, and no write lands anywhere alice herself could not write."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tornado import httpclient, websocket

from agent.lines import LineSplitter
from marco.protocol import CLOSE_BAD_MESSAGE, CLOSE_FORBIDDEN, CLOSE_UNAUTHORIZED
from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.run import this_run
from tests.support.tokens import equivalent_spellings, expired_token
from tests.support.users import UnixUser

FUZZ_ROOT = this_run().srv("fuzz-root")  # root's place, alice must never write there
CASES = 1000
# In CI (CI=true) the same cases on every run; by hand, new random ones each time.
FUZZ = settings(max_examples=CASES, deadline=None, database=None,
                derandomize=os.environ.get("CI", "").lower() in ("1", "true", "yes"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)


class Tokens:
    """A valid token for alice and the ways to forge one."""

    def __init__(self, signer: TokenSigner, user: str) -> None:
        self.valid = signer.issue(user)
        self.other_key = TokenSigner((b"k" * 40,)).issue(user)
        self.expired = expired_token(signer._serializer.secret_keys[-1], user)

    def strategy(self) -> st.SearchStrategy[tuple[str | None, bool]]:
        """(token or None, is_valid). A tampered token may be another spelling of the valid one
        (unused bits in a part's last base64 character): it must be refused too, since deny
        lists name the one canonical spelling."""
        tampered = st.integers(0, len(self.valid) - 1).flatmap(
            lambda i: st.sampled_from("AbZ09-_.").filter(lambda c: c != self.valid[i]).map(
                lambda c: self.valid[:i] + c + self.valid[i + 1:]))
        forged = st.one_of(st.none(), st.text(max_size=80), tampered,
                           st.just(self.other_key), st.just(self.expired),
                           st.just(self.valid + "x"), st.just(self.valid.upper()),
                           st.sampled_from(equivalent_spellings(self.valid)))
        return st.one_of(st.just((self.valid, True)), forged.map(lambda t: (t, False)))


@pytest.fixture
def fuzz_agent(start_agent) -> AgentProcess:
    return start_agent(node_name="fuzz", extra_args=["--max-running-per-user", "8"])


class Connection:
    """A kept-alive HTTPS connection that reopens when the agent closed it."""

    def __init__(self, agent: AgentProcess) -> None:
        self.agent = agent
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, target: str, body: bytes | None,
                headers: dict[str, str]) -> tuple[int, bytes, str]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = self.agent.connection(timeout=30)
            try:
                self.conn.request(method, target, body=body, headers=headers)
                response = self.conn.getresponse()
                data = response.read()
                if response.will_close:
                    self.conn.close()
                    self.conn = None
                return response.status, data, response.getheader("Content-Type") or ""
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    ssl.SSLEOFError):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


ROUTES = ["/v1/health", "/v1/executions", "/v1/executions?wait=1", "/v1/status",
          "/v1/files", "/v1/revocations", "/v1/stream", "/", "/v1/executions/" + "a" * 32,
          "/v1/executions/" + "a" * 32 + "/output", "/v1/executions/../health"]


def test_http_api_fuzz(fuzz_agent: AgentProcess, signer: TokenSigner, alice: UnixUser) -> None:
    tokens = Tokens(signer, alice.name)
    connection = Connection(fuzz_agent)
    seen = {"cases": 0, "accepted_forged": 0}
    query = st.dictionaries(st.sampled_from(["path", "since", "limit", "mode", "overwrite",
                                             "wait", "challenge", "id", "x"]),
                            st.text(max_size=30), max_size=3)
    paths = st.one_of(st.sampled_from(ROUTES), st.text(max_size=30).map(lambda t: "/v1/" + quote(t)))
    bodies = st.one_of(st.none(), json_values.map(lambda v: json.dumps(v).encode()),
                       st.binary(max_size=300),
                       st.fixed_dictionaries({}, optional={
                           "argv": json_values, "shell": json_values, "stdin": json_values,
                           "cwd": json_values, "env": json_values, "label": json_values,
                           "timeout": json_values}).map(lambda d: json.dumps(d).encode()))

    @FUZZ
    @given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
           path=paths, params=query, body=bodies, auth=tokens.strategy(),
           content_type=st.sampled_from(["application/json", "text/plain", "",
                                         "application/octet-stream"]))
    def case(method: str, path: str, params: dict[str, str], body: bytes | None,
             auth: tuple[str | None, bool], content_type: str) -> None:
        token, valid = auth
        if valid and method == "POST" and path.startswith("/v1/executions") and body:
            # Keep whatever runs as alice short: random shell text could be `yes`.
            try:
                data = json.loads(body)
            except ValueError:
                data = None
            if isinstance(data, dict):
                data["timeout"] = 2
                body = json.dumps(data).encode()
        headers = {"Content-Type": content_type} if content_type else {}
        if token is not None:  # raw UTF-8 bytes on the wire, as an attacker could send
            raw = token.encode("utf-8").decode("latin-1")
            headers["Authorization"] = "Bearer " + "".join(c for c in raw if c not in "\r\n\0")
        target = path + ("&" if "?" in path else "?") + urlencode(params) if params else path
        malformed = any(ord(c) < 32 or ord(c) == 127 for c in headers.get("Authorization", ""))
        try:
            status, data, kind = connection.request(method, target, body, headers)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                ssl.SSLEOFError):
            if not malformed:
                raise
            # Tornado answers malformed HTTP with a bare 400 and hangs up; with a request body
            # left unread, the hang-up can be a reset that overtakes the 400.
            seen["cases"] += 1
            return
        seen["cases"] += 1
        assert status < 500 or status == 503, (method, target, body, status, data[:300])
        if status >= 400 and not malformed:  # (tornado answers bad HTTP with a bare 400)
            assert "json" in kind and "error" in json.loads(data), (status, data[:200])
        if not valid and 200 <= status < 300 and not path.startswith("/v1/health"):
            seen["accepted_forged"] += 1

    case()
    assert seen["cases"] >= CASES and seen["accepted_forged"] == 0, seen
    assert fuzz_agent.process.poll() is None
    assert fuzz_agent.client(tokens.valid).health()["node"] == "fuzz"


def test_websocket_fuzz(fuzz_agent: AgentProcess, signer: TokenSigner, alice: UnixUser,
                        bob: UnixUser) -> None:
    tokens = Tokens(signer, alice.name)
    bobs = fuzz_agent.client(signer.issue(bob.name))
    bobs_sleep = bobs.start(["sleep", "600"])  # another user's execution id, in the mix below
    seen = {"cases": 0, "hello_forged": 0}
    ids = st.one_of(st.just(bobs_sleep), st.text(max_size=40), json_values)
    structured = st.fixed_dictionaries(
        {"type": st.sampled_from(["subscribe", "replay", "stop", "ping", "auth", "nope"])},
        optional={"id": ids, "since": json_values, "status": json_values, "data": json_values,
                  "token": st.text(max_size=20)})
    messages = st.one_of(structured.map(json.dumps), json_values.map(json.dumps),
                         st.text(max_size=200), st.just('{"type": "ping", "n": NaN}'))

    async def one(token: str | None, valid: bool, later: list[str]) -> None:
        request = httpclient.HTTPRequest(fuzz_agent.url.replace("http", "ws", 1) + "/v1/stream",
                                         ssl_options=fuzz_agent.ssl_context)
        ws = await websocket.websocket_connect(request)
        try:
            auth = {"type": "auth"} if token is None else {"type": "auth", "token": token}
            await ws.write_message(json.dumps(auth))
            first = await asyncio.wait_for(ws.read_message(), 10)
            if first is None:
                assert not valid and ws.close_code in (CLOSE_UNAUTHORIZED, CLOSE_FORBIDDEN)
                return
            hello = json.loads(first)
            assert hello["type"] == "hello"
            if not valid:
                seen["hello_forged"] += 1
            try:
                for message in later:
                    await ws.write_message(message)
                await ws.write_message(json.dumps({"type": "ping", "data": "end"}))
            except websocket.WebSocketClosedError:
                pass  # the agent closed on a bad message already: its close code is read below
            while True:  # everything answered (or the socket closed on a bad message)
                answer = await asyncio.wait_for(ws.read_message(), 10)
                if answer is None:
                    assert ws.close_code in (CLOSE_BAD_MESSAGE, CLOSE_UNAUTHORIZED), ws.close_code
                    return
                event = json.loads(answer)
                if event.get("type") == "pong" and event.get("data") == "end":
                    return
                if event.get("id") == bobs_sleep:
                    assert event["type"] == "error", event  # nothing of bob's ever shows
        finally:
            ws.close()

    @FUZZ
    @given(auth=tokens.strategy(), later=st.lists(messages, max_size=4))
    def case(auth: tuple[str | None, bool], later: list[str]) -> None:
        asyncio.run(one(auth[0], auth[1], later))
        seen["cases"] += 1

    case()
    assert seen["cases"] >= CASES and seen["hello_forged"] == 0, seen
    assert bobs.execution(bobs_sleep)["state"] == "running"  # alice's stops never touched it
    bobs.stop(bobs_sleep)
    assert fuzz_agent.process.poll() is None


@pytest.fixture
def path_sandbox(alice: UnixUser, bob: UnixUser) -> Iterator[dict[str, Path]]:
    """Places alice must not write to, reachable by `..`, absolute paths and her symlinks."""
    root_dir = FUZZ_ROOT
    shutil.rmtree(root_dir, ignore_errors=True)
    root_dir.mkdir(mode=0o755, parents=True)
    (root_dir / "victim").write_text("root's\n")
    bob_dir = Path(bob.home) / "fuzz-private"
    shutil.rmtree(bob_dir, ignore_errors=True)
    bob_dir.mkdir(mode=0o700)
    (bob_dir / "victim").write_text("bob's\n")
    os.chown(bob_dir, bob.uid, bob.gid)
    os.chown(bob_dir / "victim", bob.uid, bob.gid)
    play = Path(alice.home) / "fuzz"
    shutil.rmtree(play, ignore_errors=True)
    play.mkdir()
    for name, target in (("to-root", root_dir), ("to-bob", bob_dir),
                         ("to-victim", root_dir / "victim"), ("to-etc", Path("/etc"))):
        (play / name).symlink_to(target)
        os.lchown(play / name, alice.uid, alice.gid)
    os.chown(play, alice.uid, alice.gid)
    yield {"root": root_dir, "bob": bob_dir, "play": play}
    shutil.rmtree(root_dir, ignore_errors=True)
    shutil.rmtree(bob_dir, ignore_errors=True)
    shutil.rmtree(play, ignore_errors=True)


def snapshot(*dirs: Path) -> dict[str, tuple[int, int, bytes]]:
    found = {}
    for top in dirs:
        for path in [top, *top.rglob("*")]:
            info = path.lstat()
            found[str(path)] = (info.st_uid, info.st_mode,
                                path.read_bytes() if path.is_file() and not path.is_symlink() else b"")
    return found


def test_file_path_fuzz(fuzz_agent: AgentProcess, signer: TokenSigner, alice: UnixUser,
                        path_sandbox: dict[str, Path]) -> None:
    client = fuzz_agent.client(signer.issue(alice.name))
    before = snapshot(path_sandbox["root"], path_sandbox["bob"])
    etc_before = sorted(os.listdir("/etc"))
    seen = {"cases": 0, "written": 0}
    segment = st.one_of(st.sampled_from(["..", ".", "", "~", "to-root", "to-bob", "to-victim",
                                         "to-etc", "fuzz", "victim", "passwd", "x\x00y", "~bob",
                                         "%2e%2e", "...", "\\..\\"]),
                        st.text(min_size=1, max_size=12))
    paths = st.tuples(st.sampled_from(["", "/", "~/", "~/fuzz/", "fuzz/", f"{FUZZ_ROOT}/",
                                       str(path_sandbox["bob"]) + "/", "/etc/", "../"]),
                      st.lists(segment, min_size=0, max_size=5)).map(
        lambda parts: parts[0] + "/".join(parts[1]))

    plain_names = st.text(alphabet="ab-é", min_size=1, max_size=6).map(lambda n: "~/fuzz/w" + n)

    @FUZZ
    @given(path=paths | plain_names, overwrite=st.booleans(),
           mode=st.one_of(st.none(), st.sampled_from([0o644, 0o600, 0o4755, 0o777])))
    def case(path: str, overwrite: bool, mode: int | None) -> None:
        import io

        from marco.errors import MarcoError
        seen["cases"] += 1
        try:
            answer = client.put_file(io.BytesIO(b"fuzz\n"), path, mode=mode, overwrite=overwrite,
                                     size=5)
        except MarcoError as error:
            assert error.status < 500 or error.status == 503, (path, error.message)
            return
        seen["written"] += 1
        written = Path(answer["path"])
        info = written.lstat()
        # Written as alice, by the kernel's rules: even a setuid mode only ever makes a file
        # that runs as alice, which she may do with chmod herself.
        assert info.st_uid == alice.uid, (path, answer)
        resolved = written.resolve()
        assert not resolved.is_relative_to(path_sandbox["root"]), (path, answer)
        assert not resolved.is_relative_to(path_sandbox["bob"]), (path, answer)
        assert not resolved.is_relative_to("/etc"), (path, answer)

    case()
    assert seen["cases"] >= CASES, seen
    assert seen["written"] > 50, seen  # the fuzz also reached the success path
    assert snapshot(path_sandbox["root"], path_sandbox["bob"]) == before
    assert sorted(os.listdir("/etc")) == etc_before
    assert fuzz_agent.process.poll() is None


def _feed_in_pieces(splitter: LineSplitter, data: bytes, cuts: list[int]) -> list[str]:
    got: list[str] = []
    start = 0
    for cut in sorted({c for c in cuts if c <= len(data)}):
        got += splitter.feed(data[start:cut])
        start = cut
    return got + splitter.feed(data[start:]) + splitter.flush()


def test_line_splitter_fuzz() -> None:
    """Any bytes in any chunking come out as the input's lines (split on newline, invalid UTF-8
    replaced), and with a small cap every character of valid text still comes out, in order,
    in pieces no longer than the cap."""
    seen = {"cases": 0}

    @FUZZ
    @given(data=st.binary(max_size=3000) | st.text(max_size=1000).map(str.encode),
           text=st.text(max_size=600) | st.text(min_size=65, max_size=400).map(
               lambda t: t.replace("\n", "")),  # long lines: cut while they arrive
           cuts=st.lists(st.integers(0, 3000), max_size=20))
    def case(data: bytes, text: str, cuts: list[int]) -> None:
        seen["cases"] += 1
        # The input's own lines, computed without the splitter: no line here reaches the cap.
        segments = data.split(b"\n")
        if segments[-1] == b"":
            segments.pop()
        expected = [segment.decode("utf-8", "replace") for segment in segments]
        got = _feed_in_pieces(LineSplitter(), data, cuts)
        assert got == expected
        # Past a 64-byte cap, lines are cut at character boundaries and nothing is lost.
        small = _feed_in_pieces(LineSplitter(max_line=64), text.encode(), cuts)
        assert all(len(line.encode()) <= 64 for line in small), small
        assert "".join(small) == text.replace("\n", "")

    case()
    assert seen["cases"] >= CASES


def test_forged_tokens_never_verify(signer: TokenSigner, alice: UnixUser) -> None:
    tokens = Tokens(signer, alice.name)
    seen = {"cases": 0}

    @FUZZ
    @given(auth=tokens.strategy())
    def case(auth: tuple[str | None, bool]) -> None:
        token, valid = auth
        seen["cases"] += 1
        if valid:
            assert signer.verify(token) == alice.name
            return
        from marco.errors import AuthenticationError
        with pytest.raises(AuthenticationError):
            signer.verify(token)

    case()
    assert seen["cases"] >= CASES
