"""File upload and download as the user: the kernel decides, nothing partial is left."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import stat

import pytest

from marco.client import AgentClient
from marco.errors import BadRequest, Conflict, NotFound, PermissionDenied
from marco.tokens import TokenSigner
from tests.support.agent_process import AgentProcess
from tests.support.users import UnixUser
from tests.support.waiting import wait_for


@pytest.fixture
def alice_client(shared_agent: AgentProcess, signer: TokenSigner, alice: UnixUser) -> AgentClient:
    return shared_agent.client(signer.issue(alice.name))


def test_upload_download_round_trip_owned_by_user(alice_client: AgentClient,
                                                  alice: UnixUser) -> None:
    data = os.urandom(256 * 1024) + "ünïcödé ✓".encode()
    assert alice_client.run(["mkdir", "-p", "dir-ü"]).rc == 0
    result = alice_client.put_file(io.BytesIO(data), "~/dir-ü/fïle ✓.bin", mode=0o640,
                                   size=len(data))
    path = os.path.join(alice.home, "dir-ü", "fïle ✓.bin")
    assert result["path"] == path and result["size"] == len(data)
    info = os.stat(path)
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (alice.uid, alice.gid, 0o640)
    out = io.BytesIO()
    alice_client.get_file("dir-ü/fïle ✓.bin", out)
    assert out.getvalue() == data


def test_empty_and_chunked_uploads(alice_client: AgentClient, alice: UnixUser) -> None:
    alice_client.put_file(io.BytesIO(b""), "empty", size=0)
    assert os.path.getsize(os.path.join(alice.home, "empty")) == 0
    alice_client.put_file(io.BytesIO(b"x" * 3_000_000), "chunked")  # no length: chunked
    assert os.path.getsize(os.path.join(alice.home, "chunked")) == 3_000_000
    out = io.BytesIO()
    alice_client.get_file("empty", out)
    assert out.getvalue() == b""


def test_large_file_streams(alice_client: AgentClient, alice: UnixUser, tmp_path) -> None:
    source = tmp_path / "big"
    with open(source, "wb") as handle:
        for _ in range(64):
            handle.write(os.urandom(1024 * 1024))
    with open(source, "rb") as handle:
        alice_client.put_file(handle, "big", size=source.stat().st_size)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    with open(os.path.join(alice.home, "big"), "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == digest
    back = tmp_path / "back"
    with open(back, "wb") as handle:
        alice_client.get_file("~/big", handle)
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest


def test_no_overwrite_is_409_and_keeps_the_file(alice_client: AgentClient, alice: UnixUser) -> None:
    alice_client.put_file(io.BytesIO(b"first"), "keep.txt", size=5)
    with pytest.raises(Conflict, match="exists"):
        alice_client.put_file(io.BytesIO(b"second"), "keep.txt", overwrite=False, size=6)
    with open(os.path.join(alice.home, "keep.txt"), "rb") as handle:
        assert handle.read() == b"first"
    alice_client.put_file(io.BytesIO(b"third"), "keep.txt", overwrite=True, size=5)
    with open(os.path.join(alice.home, "keep.txt"), "rb") as handle:
        assert handle.read() == b"third"


def test_kernel_refuses_what_the_user_may_not_write(alice_client: AgentClient, alice: UnixUser,
                                                    bob: UnixUser) -> None:
    with pytest.raises(PermissionDenied):
        alice_client.put_file(io.BytesIO(b"evil"), "/etc/marcotest-x", size=4)
    assert not os.path.exists("/etc/marcotest-x")
    with pytest.raises(PermissionDenied):
        alice_client.put_file(io.BytesIO(b"evil"), os.path.join(bob.home, "x"), size=4)
    assert not os.path.exists(os.path.join(bob.home, "x"))
    with pytest.raises(PermissionDenied):
        alice_client.get_file("/etc/shadow", io.BytesIO())
    # A symlink in alice's home pointing into bob's home does not help her either.
    link = os.path.join(alice.home, "to-bob")
    if not os.path.islink(link):
        os.symlink(bob.home, link)
    with pytest.raises(PermissionDenied):
        alice_client.put_file(io.BytesIO(b"evil"), "to-bob/x", size=4)
    assert not os.path.exists(os.path.join(bob.home, "x"))
    leftovers = [n for n in os.listdir(alice.home) if n.endswith(".tmp")]
    assert leftovers == []


def test_bad_paths_are_4xx(alice_client: AgentClient) -> None:
    with pytest.raises(BadRequest, match=r"\.\."):
        alice_client.put_file(io.BytesIO(b"x"), "../marcotest-bob/x", size=1)
    with pytest.raises(BadRequest, match=r"\.\."):
        alice_client.get_file("~/a/../../etc/passwd", io.BytesIO())
    with pytest.raises(BadRequest, match="NUL"):
        alice_client.get_file("a\0b", io.BytesIO())
    with pytest.raises(NotFound):
        alice_client.get_file("does-not-exist", io.BytesIO())
    with pytest.raises(NotFound):
        alice_client.put_file(io.BytesIO(b"x"), "no/such/dir/file", size=1)
    with pytest.raises(BadRequest, match="octal"):
        alice_client._request("PUT", "/v1/files?path=m&mode=rwx")
    with pytest.raises(BadRequest, match="not a regular file"):
        alice_client.get_file("~", io.BytesIO())


def test_interrupted_upload_leaves_nothing(shared_agent: AgentProcess, signer: TokenSigner,
                                           alice: UnixUser) -> None:
    token = signer.issue(alice.name)
    with shared_agent.open_socket() as sock:
        sock.sendall(f"PUT /v1/files?path=partial HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {token}\r\nContent-Length: 1000000\r\n\r\n"
                     .encode() + b"y" * 1000)
        # The upload is under way first (its temp file exists), then the client goes away.
        wait_for(lambda: any(name.startswith(".partial.marco-") for name in os.listdir(alice.home)),
                 what="the upload's temp file")
    wait_for(lambda: not any(".marco-" in name for name in os.listdir(alice.home)),
             what="the interrupted upload's temp file removed")
    assert not os.path.exists(os.path.join(alice.home, "partial"))


def test_fifo_download_is_refused_without_hanging(alice_client: AgentClient,
                                                  alice: UnixUser) -> None:
    assert alice_client.run(["mkfifo", "a-fifo"]).rc == 0
    with pytest.raises(BadRequest, match="not a regular file"):
        alice_client.get_file("a-fifo", io.BytesIO())
    # No file helper left waiting on the fifo (its command line names the path it serves;
    # other tests' processes of alice's may be running meanwhile).
    processes = alice_client.run(["ps", "-u", alice.name, "-o", "args="]).stdout.splitlines()
    assert not [line for line in processes if b"a-fifo" in line]


def test_the_async_client_moves_files_like_the_sync_one(shared_agent: AgentProcess,
                                                          signer: TokenSigner,
                                                          alice: UnixUser) -> None:
    """Same calls through Tornado: a file or a chunk callable up, a stream down, typed errors
    (the body of an error answer never lands in the destination)."""
    token = signer.issue(alice.name)
    data = os.urandom(3 * 1024 * 1024 + 5)
    chunks = [b"callable ", b"chunks", b""]

    async def scenario() -> tuple[int, bytes, bytes]:
        client = shared_agent.async_client(token)
        await client.put_file(io.BytesIO(data), "async.bin", mode=0o600, size=len(data))
        await client.put_file(lambda: chunks.pop(0), "async.txt")
        out, text = io.BytesIO(), io.BytesIO()
        count = await client.get_file("async.bin", out)
        await client.get_file("~/async.txt", text)
        missing = io.BytesIO()
        with pytest.raises(NotFound):
            await client.get_file("no-such-file", missing)
        assert missing.getvalue() == b""
        with pytest.raises(Conflict):
            await client.put_file(io.BytesIO(b"x"), "async.txt", overwrite=False, size=1)
        return count, out.getvalue(), text.getvalue()

    count, body, text = asyncio.run(scenario())
    assert count == len(data) and body == data and text == b"callable chunks"
    assert stat.S_IMODE(os.stat(os.path.join(alice.home, "async.bin")).st_mode) == 0o600


def test_mkdir_makes_the_directory_as_ansible_makes_its_remote_tmp(
        alice_client: AgentClient, alice: UnixUser) -> None:
    """`mkdir=true`: missing ancestors and the directory itself are made with mode 0700, as
    the user; a directory that already exists is a 409 and nothing is written."""
    base = os.path.join(alice.home, "made", "tmp")
    target = os.path.join(base, "ansible-tmp-1", "source")
    alice_client.put_file(io.BytesIO(b"data"), target, mode=0o600, size=4, mkdir=True)
    for directory in (os.path.join(alice.home, "made"), base, os.path.dirname(target)):
        info = os.stat(directory)
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (alice.uid, 0o700), directory
    with open(target, "rb") as handle:
        assert handle.read() == b"data"
    with pytest.raises(Conflict):
        alice_client.put_file(io.BytesIO(b"other"), os.path.join(base, "ansible-tmp-1", "x"),
                              size=5, mkdir=True)
    assert not os.path.exists(os.path.join(base, "ansible-tmp-1", "x"))
    # Without mkdir a missing directory stays a 404, as before.
    with pytest.raises(NotFound):
        alice_client.put_file(io.BytesIO(b"x"), os.path.join(base, "missing", "x"), size=1)


def test_a_result_names_the_user_and_home(shared_agent: AgentProcess, signer: TokenSigner,
                                          alice: UnixUser) -> None:
    """What `echo ~` prints is in every ?wait=1 answer, binary and JSON alike."""
    token = signer.issue(alice.name)
    for binary in (True, False):
        with shared_agent.client(token, binary=binary) as client:
            result = client.run("echo ~")
        assert (result.user, result.home) == (alice.name, alice.home)
        assert result.stdout.decode().strip() == alice.home
