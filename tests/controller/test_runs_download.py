"""Downloading a run's output (docs/runs.md, "The controller's API"): plain text with or without
terminal escapes and JSON lines, of one execution or the whole run, streamed, owners only; and
the run page's links, in a real browser (Debian chromium + Playwright), against a real
controller, real agents and real Unix users."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
from typing import Any

from playwright.sync_api import expect

from marco.client import AgentClient
from marco.tokens import TokenSigner
from tests.support.command_runs import archived_command_run
from tests.support.controller_process import ControllerProcess
from tests.support.http import call
from tests.support.pki import TestPki
from tests.support.users import UnixUser
from tests.support.waiting import wait_for
from tests.support.web import TIMEOUT_MS, open_logged_in

Cluster = tuple[ControllerProcess, list[str]]
# A coloured line, a window title (OSC), a charset switch (ESC ( B), a \r progress line, and
# a line on stderr.
PRINTF = (r"printf '\033[1;31mred\033[0m plain\n\033]0;title\007titled\n\033(Bcharset\n"
          r"50%%\r100%%\n'")
COLOURED = PRINTF + "; echo oops >&2"
COLOURED_OUT = ["\x1b[1;31mred\x1b[0m plain", "\x1b]0;title\x07titled", "\x1b(Bcharset",
                "50%\r100%"]
STRIPPED_OUT = ["red plain", "titled", "charset", "50%\r100%"]


def download(controller: ControllerProcess, path: str,
             token: str | None) -> tuple[int, dict[str, str], bytes]:
    """A GET as a client downloading it: status, headers, the body's bytes."""
    conn = controller.connection(timeout=120)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def executions(controller: ControllerProcess, token: str, run_id: str) -> list[dict[str, Any]]:
    status, answer = call(controller, "GET", f"/api/runs/{run_id}/executions", token=token)
    assert status == 200, answer
    return list(answer["executions"])


def output_events(controller: ControllerProcess, token: str, run_id: str,
                  execution_id: str) -> list[dict[str, Any]]:
    """Every output event of an archived execution, through the paged output call."""
    events: list[dict[str, Any]] = []
    since = 0
    while True:
        query = urllib.parse.urlencode({"execution": execution_id, "since": since})
        status, page = call(controller, "GET", f"/api/runs/{run_id}/output?{query}", token=token)
        assert status == 200, page
        events += page["events"]
        if page["end"]:
            return events
        since = page["next"]


def test_a_big_output_downloads_byte_for_byte(cluster: Cluster, alice: UnixUser,
                                               signer: TokenSigner) -> None:
    controller, names = cluster
    token = signer.issue(alice.name)
    run_id = archived_command_run(controller, token, names[:1], "seq 1 100000")
    expected = subprocess.run(["seq", "1", "100000"], capture_output=True, check=True).stdout
    [execution] = executions(controller, token, run_id)
    eid = execution["execution_id"]
    status, headers, body = download(
        controller, f"/api/runs/{run_id}/output.txt?execution={urllib.parse.quote(eid)}", token)
    assert status == 200, body[:200]
    assert body == expected  # 100,000 lines over 5 pages of 20,000
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers.get("transfer-encoding") == "chunked"  # sent page by page as read
    disposition = headers["content-disposition"]
    assert re.fullmatch(r'attachment; filename="r[0-9a-f]{20}-[A-Za-z0-9_-]+\.txt"', disposition)
    assert disposition.startswith(f'attachment; filename="{run_id}-')
    # The whole run: every line after its host, as `marco logs` prints it.
    status, headers, body = download(controller, f"/api/runs/{run_id}/output.txt", token)
    assert status == 200
    assert body == b"".join(f"{names[0]} | ".encode() + line + b"\n"
                            for line in expected.splitlines())
    assert headers["content-disposition"] == f'attachment; filename="{run_id}.txt"'


def test_a_coloured_line_keeps_its_escapes_or_drops_them(cluster: Cluster, alice: UnixUser,
                                                         signer: TokenSigner) -> None:
    controller, names = cluster
    token = signer.issue(alice.name)
    run_id = archived_command_run(controller, token, names[:1], COLOURED)
    [execution] = executions(controller, token, run_id)
    query = f"execution={urllib.parse.quote(execution['execution_id'])}"
    status, _, kept = download(controller, f"/api/runs/{run_id}/output.txt?{query}", token)
    assert status == 200
    text = kept.decode()
    assert [line for line in text.split("\n") if line != "oops"] == [*COLOURED_OUT, ""]
    status, headers, stripped = download(
        controller, f"/api/runs/{run_id}/output.txt?{query}&ansi=strip", token)
    assert status == 200 and "\x1b" not in stripped.decode()
    assert [line for line in stripped.decode().split("\n") if line != "oops"] == [
        *STRIPPED_OUT, ""]
    assert headers["content-disposition"].endswith('-plain.txt"')
    # The whole run marks stderr lines as `marco logs` does.
    status, _, whole = download(controller, f"/api/runs/{run_id}/output.txt?ansi=strip", token)
    lines = whole.decode().split("\n")
    assert f"{names[0]} ! oops" in lines and f"{names[0]} | red plain" in lines
    assert download(controller, f"/api/runs/{run_id}/output.txt?ansi=maybe", token)[0] == 400


def test_json_lines_carry_each_lines_seq_and_time(cluster: Cluster, alice: UnixUser,
                                                  signer: TokenSigner) -> None:
    controller, names = cluster
    token = signer.issue(alice.name)
    run_id = archived_command_run(controller, token, names, COLOURED)
    listed = executions(controller, token, run_id)
    eid = listed[0]["execution_id"]
    status, headers, body = download(
        controller, f"/api/runs/{run_id}/output.jsonl?execution={urllib.parse.quote(eid)}",
        token)
    assert status == 200 and headers["content-type"].startswith("application/x-ndjson")
    assert headers["content-disposition"].endswith('.jsonl"')
    items = [json.loads(line) for line in body.decode().splitlines()]
    expected = [{"seq": event["seq"] + index, "time": event["time"], "stream": event["stream"],
                 "line": line}
                for event in output_events(controller, token, run_id, eid)
                for index, line in enumerate(event["lines"])]
    assert items == expected
    assert [item["seq"] for item in items] == list(range(5))
    assert all(isinstance(item["time"], float) for item in items)
    assert [i["line"] for i in items if i["stream"] == "stdout"] == COLOURED_OUT
    # The whole run's lines name their host and execution, each execution in the order listed.
    status, _, body = download(controller, f"/api/runs/{run_id}/output.jsonl", token)
    items = [json.loads(line) for line in body.decode().splitlines()]
    assert [(i["host"], i["execution_id"]) for i in items] == [
        (e["host"], e["execution_id"]) for e in listed for _ in range(5)]
    assert [i["seq"] for i in items] == [*range(5), *range(5)]


def test_only_the_owner_downloads(cluster: Cluster, alice: UnixUser, bob: UnixUser,
                                  signer: TokenSigner) -> None:
    controller, names = cluster
    token, other = signer.issue(alice.name), signer.issue(bob.name)
    run_id = archived_command_run(controller, token, names[:1], "echo mine")
    eid = urllib.parse.quote(executions(controller, token, run_id)[0]["execution_id"])
    for file in ("output.txt", "output.jsonl"):
        for query in ("", f"?execution={eid}", "?ansi=strip"):
            status, _, body = download(controller, f"/api/runs/{run_id}/{file}{query}", other)
            assert status == 404 and b"mine" not in body, (file, query, body)
        assert download(controller, f"/api/runs/{run_id}/{file}", None)[0] == 401
        assert download(controller, f"/api/runs/{run_id}/{file}?execution=nope", token)[0] == 404
        assert download(controller, f"/api/runs/r{'0' * 20}/{file}", token)[0] == 404
    assert download(controller, f"/api/runs/{run_id}/output.txt?execution={eid}",
                    token)[2] == b"mine\n"


def test_the_run_pages_links_download_the_output(cluster: Cluster, browser: Any,
                                                 alice: UnixUser, signer: TokenSigner) -> None:
    controller, names = cluster
    token = signer.issue(alice.name)
    run_id = archived_command_run(controller, token, names[:1], PRINTF)
    page = browser.new_context(accept_downloads=True).new_page()
    open_logged_in(page, controller, alice, f"/runs/{run_id}")
    pane = page.locator(f'.host-pane[data-host="{names[0]}"]')
    expect(pane.locator(".line").first).to_be_visible(timeout=TIMEOUT_MS)
    for name, expected in (("text", COLOURED_OUT), ("text without colours", STRIPPED_OUT)):
        with page.expect_download(timeout=TIMEOUT_MS) as info:
            pane.get_by_role("link", name=name, exact=True).click()
        got = info.value
        assert got.suggested_filename.startswith(run_id)
        assert open(got.path(), "rb").read() == "".join(f"{line}\n" for line in expected).encode()
    with page.expect_download(timeout=TIMEOUT_MS) as info:
        pane.get_by_role("link", name="JSON lines", exact=True).click()
    lines = open(info.value.path(), "rb").read().decode().splitlines()
    assert [json.loads(line)["line"] for line in lines] == COLOURED_OUT
    with page.expect_download(timeout=TIMEOUT_MS) as info:
        page.locator("#run-downloads").get_by_role("link", name="text", exact=True).click()
    assert open(info.value.path(), "rb").read() == "".join(
        f"{names[0]} | {line}\n" for line in COLOURED_OUT).encode()
    page.context.close()


def playbook_with_two_tasks(controller: ControllerProcess, token: str, host: str,
                            pki: TestPki) -> str:
    """A playbook run whose two tasks ran on `host`, each execution tagged as the connection
    plugin tags it (t1 prints one, two; t2 prints three), all of it archived; its id."""
    status, answer = call(controller, "POST", "/api/runs",
                          {"kind": "playbook", "title": "ansible-playbook site.yml"}, token)
    assert status == 201, answer
    run_id = str(answer["id"])
    where = controller.inventory_hosts(token)[host]
    with AgentClient(where["ansible_host"], where["ansible_port"], token, tls=pki.client_tls(),
                     node=host) as client:
        for task_id, command in (("t1", "echo one; echo two"), ("t2", "echo three")):
            client.start(command, tags={"run": run_id, "task": task_id, "host": host})
    events: list[dict[str, Any]] = [{"type": "play_start", "play": "all", "play_id": "p1"}]
    for task_id in ("t1", "t2"):
        events += [{"type": "task_start", "task": f"task {task_id}", "task_id": task_id,
                    "play_id": "p1", "action": "ansible.builtin.shell"},
                   {"type": "host_result", "task_id": task_id, "host": host, "status": "changed",
                    "rc": 0, "duration": 0.1}]
    status, answer = call(controller, "POST", f"/api/runs/{run_id}/events", {"events": events},
                          token)
    assert status == 200, answer

    def archived() -> bool:
        listed = executions(controller, token, run_id)
        return len(listed) == 2 and all(e["archived"] or e["state"] == "exited" for e in listed)

    wait_for(archived, what="both tasks' executions ended")
    return run_id


def test_a_host_or_a_task_on_it_downloads_alone(cluster: Cluster, browser: Any, alice: UnixUser,
                                                signer: TokenSigner, pki: TestPki) -> None:
    """`host=` gives that host's executions' lines as printed (no prefix: one host's), with
    `task=` that task's only; the open result's link downloads it."""
    controller, names = cluster
    token = signer.issue(alice.name)
    run_id = playbook_with_two_tasks(controller, token, names[0], pki)
    host = urllib.parse.quote(names[0])
    # The executions in the order listed: as their agent listed them when they were stored.
    assert download(controller, f"/api/runs/{run_id}/output.txt?host={host}",
                    token)[2] in (b"one\ntwo\nthree\n", b"three\none\ntwo\n")
    status, headers, body = download(
        controller, f"/api/runs/{run_id}/output.txt?host={host}&task=t2", token)
    assert (status, body) == (200, b"three\n")
    assert headers["content-disposition"] == (
        f'attachment; filename="{run_id}-{names[0].replace(".", "_")}-t2.txt"')
    assert download(controller, f"/api/runs/{run_id}/output.txt?host={names[1]}",
                    token)[2] == b""
    page = browser.new_context(accept_downloads=True).new_page()
    open_logged_in(page, controller, alice, f"/runs/{run_id}")
    page.locator(f'tr.grid-task[data-task="t1"] button.cell[data-host="{names[0]}"]').click(
        timeout=TIMEOUT_MS)
    expect(page.locator("#details-output .line")).to_have_count(2, timeout=TIMEOUT_MS)
    with page.expect_download(timeout=TIMEOUT_MS) as info:
        page.locator("#details-downloads").get_by_role("link", name="text", exact=True).click()
    assert open(info.value.path(), "rb").read() == b"one\ntwo\n"
    call(controller, "POST", f"/api/runs/{run_id}/finish", {}, token)
    page.context.close()
