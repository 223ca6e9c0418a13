"""The `marco.fleet.marco_runs` callback: one `ansible-playbook` invocation recorded as a run on
the Marco controller (docs/runs.md): registered at the first playbook start, then play and
task starts, each host's result and the recap, as events.

The playbook never waits for the controller except once, to register the run (bounded by
`timeout`): every later event is only put on a queue, which one background thread hands in
batches to a sender process (`runs_sender`: no TLS in a thread of a process that forks).
The run id goes into the environment (MARCO_RUN) before any task runs, so the forked
workers' marco connections tag their executions with it. A controller that cannot be reached
(or no credentials) costs one warning; the playbook goes on and its events are dropped.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import math
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from ansible.plugins.callback import CallbackBase

from marco.cli import controller_url
from marco.controller_client import call_controller
from marco.credentials import find_token
from marco.errors import AgentUnreachable, Conflict, MarcoError
from marco.runs import MAX_META_BYTES, status_from_stats
from marco.runs import MAX_TITLE as MAX_TITLE_CHARS

from .connection import RUN_VARIABLE

MAX_MSG_CHARS = 2000            # a result's short message (docs/runs.md)
MAX_EVENT_BYTES = 64 * 1024     # an event as JSON, result included (the controller's limit)
MAX_NAME_CHARS = 1000           # a play's or task's name, a module's name: cut with "…"
MAX_BATCH_EVENTS = 1000         # events per POST (the controller's limit)
MAX_BATCH_BYTES = 1024 * 1024   # and at most about this much JSON per POST
CUT_VALUE_CHARS = 4096          # what is left of a large value in a result cut to fit
NO_LOG_MSG = "output hidden: no_log"
HIDDEN = "<hidden>"
MAX_CLEAN_DEPTH = 32            # results nested deeper are cut there (never sent unstripped)
TOO_DEEP = "… (cut: nested too deep)"


def parsed_arguments(argv: list[str]) -> Any | None:
    """`argv` parsed by ansible-playbook's own option parser (every spelling it takes: `-e`,
    `--extra=`, `-Ce`, ...), or None if it does not parse."""
    from ansible.cli.playbook import PlaybookCLI  # Ansible's CLI is loaded only when used

    cli = PlaybookCLI(["ansible-playbook", *argv])
    try:
        cli.init_parser()
        with contextlib.redirect_stderr(io.StringIO()):  # its usage text is not ours to print
            return cli.parser.parse_args(argv)
    except (SystemExit, Exception):  # noqa: BLE001 - a title is never worth a failed playbook
        return None


def command_line(argv: list[str]) -> list[str]:
    """The invocation's arguments with inline extra variables hidden (they may be passwords);
    `-e @file` names a file and stays. The values come from Ansible's parser, so any option
    spelling hides them; an argument that is such a value, or an option ending in one, shows
    `<hidden>` instead (an argument Ansible cannot parse hides them all)."""
    options = parsed_arguments(argv)
    if options is None:
        return [HIDDEN] if argv else []
    secrets = {value for value in getattr(options, "extra_vars", None) or []
               if value and not value.startswith("@")}
    shown: list[str] = []
    for arg in argv:
        if arg in secrets:
            shown.append(HIDDEN)
            continue
        if arg.startswith("-"):
            secret = next((v for v in secrets if arg.endswith(v)), None)
            if secret is not None:
                arg = arg[:len(arg) - len(secret)] + HIDDEN
        shown.append(arg)
    return shown


def check_mode(argv: list[str]) -> bool:
    """Whether the invocation is a dry run (`--check`, `-C`, `-DC`, `--ch`, ...)."""
    options = parsed_arguments(argv)
    return bool(getattr(options, "check", False))


def shortened(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, ending in "…" when cut."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def run_title(argv: list[str]) -> str:
    return shortened(shlex.join(["ansible-playbook", *command_line(argv)]), MAX_TITLE_CHARS)


def run_meta(playbook: str, argv: list[str]) -> dict[str, Any]:
    """The run's meta within the controller's limit: arguments that do not fit are left out
    (the last one says how many), so a huge command line never costs the run."""
    args = [shortened(arg, MAX_NAME_CHARS) for arg in command_line(argv)]
    meta = {"playbook": shortened(playbook, MAX_NAME_CHARS * 4), "args": args,
            "cwd": shortened(os.getcwd(), MAX_NAME_CHARS * 4), "check": check_mode(argv)}
    room = MAX_META_BYTES - 256  # for the "… (N more)" marker and the JSON around it
    if _json_size(meta) <= room:
        return meta
    total = len(args)
    while args and _json_size(meta) > room:
        args.pop()
    args.append(f"… ({total - len(args)} more)")
    return meta


def _json_size(value: Any) -> int:
    """Bytes of `value` as JSON the way the controller counts them: UTF-8, or escaped when
    a lone surrogate makes UTF-8 impossible (then every non-ASCII character is longer)."""
    try:
        return len(json.dumps(value, default=str, ensure_ascii=False).encode("utf-8"))
    except UnicodeEncodeError:
        return len(json.dumps(value, default=str).encode("utf-8"))


def _stripped(value: Any, depth: int = 0) -> Any:
    """`value` without `invocation` and `_ansible_*` keys at any level (loop results carry
    their own); below MAX_CLEAN_DEPTH a value is cut, so nothing deeper goes out unstripped."""
    if depth >= MAX_CLEAN_DEPTH:
        return TOO_DEEP
    if isinstance(value, Mapping):
        return {key: _stripped(item, depth + 1) for key, item in value.items()
                if key != "invocation" and not str(key).startswith("_ansible_")}
    if isinstance(value, (list, tuple)):
        return [_stripped(item, depth + 1) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity: the controller refuses the batch
    return value


def clean_result(result: Mapping[str, Any], limit: int) -> dict[str, Any]:
    """A module's result without `invocation` (its arguments) and Ansible's internal keys,
    at every level, as plain JSON data of at most `limit` bytes: the largest values are cut
    first."""
    data: dict[str, Any] = json.loads(json.dumps(_stripped(result), default=str))
    for key in sorted(data, key=lambda k: _json_size(data[k]), reverse=True):
        if _json_size(data) <= limit:
            return data
        text = data[key] if isinstance(data[key], str) else json.dumps(data[key])
        data[key] = text[:CUT_VALUE_CHARS] + "… (cut)"
    return data if _json_size(data) <= limit else {"cut": True}


def short_message(result: Mapping[str, Any]) -> str:
    """The result's `msg`, else its stderr (failed commands), cut to MAX_MSG_CHARS."""
    message = result.get("msg") or result.get("stderr") or ""
    text = message if isinstance(message, str) else json.dumps(message, default=str)
    return shortened(text, MAX_MSG_CHARS)


def host_result(raw: dict[str, Any]) -> dict[str, Any]:
    """A `host_result` event from what the callback queued (the result still raw): done in the
    sender thread, so a task pays only for the queueing."""
    result = raw.pop("raw_result")
    if raw.pop("no_log"):
        return {**raw, "msg": NO_LOG_MSG, "rc": None}
    rc = result.get("rc")
    event = {**raw, "msg": short_message(result),
             "rc": rc if isinstance(rc, int) and not isinstance(rc, bool) else None}
    event["result"] = clean_result(result, MAX_EVENT_BYTES - _json_size(event) - 256)
    return event


def _result_data(result: Any) -> Mapping[str, Any]:
    """The module's result dict (`result` since ansible-core 2.19, `_result` before)."""
    data = getattr(result, "result", None)
    return data if isinstance(data, Mapping) else result._result


def _plain_name(value: Any) -> str | None:
    """`value` when it is a host name, not a template left unrendered (a loop's
    `{{ item }}` at the task's level)."""
    if isinstance(value, str) and value and "{{" not in value and "{%" not in value:
        return value
    return None


def delegated_host(result: Any) -> str | None:
    """The inventory name of the host a delegated task ran on, or None. Before 2.19 the
    result names it (`_ansible_delegated_vars.ansible_delegated_host`); 2.19 keeps only the
    delegate's address there, so it comes from the worker's rendered task fields, else the
    task's own `delegate_to` (rendered when the strategy could). A loop delegating to a
    different host per item has no single one: None."""
    delegated = _result_data(result).get("_ansible_delegated_vars")
    if isinstance(delegated, Mapping):
        name = _plain_name(delegated.get("ansible_delegated_host"))
        if name is not None:
            return name
    fields = getattr(result, "task_fields", None) or getattr(result, "_task_fields", None)
    if isinstance(fields, Mapping) and fields.get("delegate_to"):
        return _plain_name(fields.get("delegate_to"))
    return _plain_name(getattr(result.task, "delegate_to", None))


class SenderProcess:
    """The `runs_sender` process and its pipes: `post` sends one batch and returns when the
    controller has taken it, or raises the error it gave (AgentUnreachable if the process
    is gone)."""

    def __init__(self, url: str, path: str, token: str, timeout: float) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root,
                                                           env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ansible_plugins.core.runs_sender"], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, close_fds=True,
            start_new_session=True)  # a Ctrl-C at the terminal is the playbook's, not its
        assert self.process.stdin is not None and self.process.stdout is not None
        self.lines, self.answers = self.process.stdin, self.process.stdout
        # The token goes through the pipe, not argv, which every user may read.
        self._write({"url": url, "path": path, "token": token, "timeout": timeout})

    def _write(self, message: dict[str, Any]) -> None:
        try:
            self.lines.write(json.dumps(message) + "\n")
            self.lines.flush()
        except (OSError, ValueError):
            raise AgentUnreachable("the runs sender process has ended") from None

    def post(self, events: list[dict[str, Any]]) -> None:
        self._write({"events": events})
        answer = json.loads(self.answers.readline() or "null")
        if not isinstance(answer, dict):
            raise AgentUnreachable("the runs sender process has ended")
        if not answer.get("ok"):
            raise MarcoError(str(answer.get("error")))

    def close(self) -> None:
        """End of input: the process ends once it has answered what it took."""
        try:
            self.lines.close()
        except OSError:
            pass


class EventSender:
    """One background thread that sends queued events to POST /api/runs/ID/events in
    batches; after its first failure it drops everything (the failure is kept for one
    warning)."""

    def __init__(self, post: Callable[[list[dict[str, Any]]], Any], max_queued: int) -> None:
        self.post = post
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=max_queued)
        self.failure: str | None = None
        self.dropped = 0
        self.thread = threading.Thread(target=self._loop, name="marco-runs", daemon=True)
        self.thread.start()

    def put(self, event: dict[str, Any], wait: float = 0) -> bool:
        """Queue an event, waiting at most `wait` for room: a full queue drops it (and counts
        it). Results never wait; the recap, which ends the run, may. True when queued."""
        if self.failure is not None:
            return False
        try:
            self.queue.put(event, timeout=wait) if wait > 0 else self.queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def drain(self, wait: float) -> bool:
        """Send what is queued, waiting at most `wait` seconds; True when every queued event
        was taken by the controller (events dropped before they were queued do not count)."""
        deadline = time.monotonic() + wait
        flushed = threading.Event()  # set by the thread once everything before it is done
        try:
            self.queue.put(flushed, timeout=wait)
        except queue.Full:
            return False
        return flushed.wait(max(deadline - time.monotonic(), 0)) and self.failure is None

    def flush(self, wait: float) -> bool:
        """`drain`, and True only when nothing was dropped either: all went out."""
        return self.drain(wait) and not self.dropped

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            batch, flush = self._batch(first)
            if batch and self.failure is None:
                try:
                    self.post(batch)
                except MarcoError as error:
                    self.failure = str(error)
                except Exception as error:  # noqa: BLE001 - never let the thread die silently
                    self.failure = f"{type(error).__name__}: {error}"
            if flush is not None:
                flush.set()

    def _batch(self, first: Any) -> tuple[list[dict[str, Any]], threading.Event | None]:
        """`first` and what else is queued, up to a batch's limits; and the flush marker met,
        if any (nothing after it is taken)."""
        if isinstance(first, threading.Event):
            return [], first
        batch = [self._ready(first)]
        size = _json_size(batch[0])
        while len(batch) < MAX_BATCH_EVENTS and size < MAX_BATCH_BYTES:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, threading.Event):
                return batch, item
            batch.append(self._ready(item))
            size += _json_size(batch[-1])
        return batch, None

    @staticmethod
    def _ready(event: dict[str, Any]) -> dict[str, Any]:
        """An event as sent: a queued raw result becomes its `host_result` here."""
        return host_result(event) if "raw_result" in event else event


class MarcoRunsCallback(CallbackBase):
    """Records the playbook as a run on the Marco controller (docs/runs.md)."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "marco.fleet.marco_runs"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run_id: str | None = None
        self.permalink: str | None = None
        self.sender: EventSender | None = None
        self.process: SenderProcess | None = None
        self.started = False          # the first playbook start has been seen
        self.warned = False
        self.play_id: str | None = None
        self.ended = False            # the run is ended: recap confirmed, or finish tried
        self.finish_to: tuple[str, str, float] | None = None  # url, token, timeout
        self.host_starts: dict[tuple[str, str], float] = {}

    # -- registering, warning, sending ----------------------------------------------------------

    def _option(self, name: str, default: Any) -> Any:
        try:
            value = self.get_option(name)
        except KeyError:
            return default
        return default if value is None else value

    def _warn_once(self, message: str) -> None:
        if not self.warned:
            self.warned = True
            self._display.warning(f"marco_runs: {message}; the playbook goes on without "
                                  "being recorded")

    def _register(self, playbook_file: str) -> None:
        """POST /api/runs and export the run id; any failure is one warning."""
        timeout = float(self._option("timeout", 5.0))
        try:
            url = controller_url(self._option("controller", None) or None)
            token = find_token()
            argv = sys.argv[1:]
            meta = run_meta(os.path.abspath(playbook_file), argv)
            answer = call_controller(url, "/api/runs", token, {
                "kind": "playbook", "title": run_title(argv), "meta": meta}, timeout=timeout)
            self.run_id = str(answer["id"])
        except (MarcoError, KeyError, TypeError) as error:
            self._warn_once(f"cannot record this playbook as a run ({error})")
            return
        self.permalink = urllib.parse.urljoin(url + "/", str(answer.get("url") or ""))
        self.finish_to = (url, token, timeout)
        atexit.register(self._interrupted)
        os.environ[RUN_VARIABLE] = self.run_id  # before any worker forks: they inherit it
        try:
            self.process = SenderProcess(url, f"/api/runs/{self.run_id}/events", token,
                                         timeout)
        except (OSError, MarcoError) as error:
            # The run is registered: the recap's place is taken by a finish at the end.
            self._warn_once(f"cannot start the runs sender ({error})")
            return
        self.sender = EventSender(self.process.post,
                                  int(self._option("max_queued_events", 10000)))

    def _finish(self, status: str) -> None:
        """End the run with POST /api/runs/ID/finish, once, bounded by `timeout`: the recap
        did not go out (or never will). A failure is the one warning, if none was given."""
        if self.ended or self.finish_to is None:
            return
        self.ended = True
        url, token, timeout = self.finish_to
        try:
            call_controller(url, f"/api/runs/{self.run_id}/finish", token,
                            {"status": status}, timeout=timeout)
        except Conflict:
            pass  # the recap got there after all: the run is ended
        except MarcoError as error:
            # The controller marks runs left running as interrupted when it restarts.
            self._warn_once(f"cannot end the run ({error})")

    def _interrupted(self) -> None:
        """At exit without a recap (Ctrl-C, a fatal error): send what is queued, then end the
        run as `interrupted`, within bounded waits."""
        if self.ended:
            return
        if self.sender is not None:
            self.sender.flush(float(self._option("flush_seconds", 5.0)))
        if self.process is not None:
            self.process.close()
        self._finish("interrupted")

    def _emit(self, event: dict[str, Any], wait: float = 0) -> None:
        if self.sender is None:
            return
        if self.sender.failure is not None:
            self._warn_once(f"the controller stopped taking this run's events "
                            f"({self.sender.failure})")
            return
        event["time"] = time.time()
        self.sender.put(event, wait)

    # -- Ansible's callbacks --------------------------------------------------------------------

    def v2_playbook_on_start(self, playbook: Any) -> None:
        if not self.started:  # several playbook files in one invocation: one run
            self.started = True
            if not self._option("enabled", True):
                return  # switched off for this invocation: no run, no warning
            self._register(str(getattr(playbook, "_file_name", "") or ""))

    def v2_playbook_on_play_start(self, play: Any) -> None:
        self.play_id = str(play._uuid)
        # Names are cut: one event over the controller's limit refuses its whole batch, and
        # the sender drops every later event of the run after a refusal.
        self._emit({"type": "play_start", "play": shortened(play.get_name(), MAX_NAME_CHARS),
                    "play_id": self.play_id})

    def v2_playbook_on_task_start(self, task: Any, is_conditional: bool) -> None:
        action = str(getattr(task, "resolved_action", None) or task.action)
        self._emit({"type": "task_start", "task": shortened(task.get_name(), MAX_NAME_CHARS),
                    "task_id": str(task._uuid), "play_id": self.play_id,
                    "action": shortened(action, MAX_NAME_CHARS)})

    def v2_playbook_on_handler_task_start(self, task: Any) -> None:
        self.v2_playbook_on_task_start(task, False)

    def v2_runner_on_start(self, host: Any, task: Any) -> None:
        self.host_starts[(host.get_name(), str(task._uuid))] = time.monotonic()

    def v2_runner_on_ok(self, result: Any) -> None:
        self._result(result, "changed" if _result_data(result).get("changed") else "ok")

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._result(result, "failed")

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._result(result, "unreachable")

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._result(result, "skipped")

    def _result(self, result: Any, status: str) -> None:
        """Queue the host's result raw (a shallow copy: other callbacks may change the dict);
        the sender thread cleans and bounds it."""
        if self.sender is None:
            return
        host, task_id = result.host.get_name(), str(result.task._uuid)
        started = self.host_starts.pop((host, task_id), None)
        raw = _result_data(result)
        no_log = bool(result.task.no_log or raw.get("_ansible_no_log") or "censored" in raw)
        event = {"type": "host_result", "task_id": task_id, "host": host, "status": status,
                 "duration": round(time.monotonic() - started, 6) if started else None,
                 "no_log": no_log, "raw_result": {} if no_log else dict(raw)}
        delegate = delegated_host(result)
        if delegate is not None:
            # The controller collects the task's output from the node it ran on.
            event["delegate"] = shortened(delegate, MAX_NAME_CHARS)
        self._emit(event)

    def v2_playbook_on_stats(self, stats: Any) -> None:
        """Send the recap, which ends the run; if it is not confirmed within `flush_seconds`
        (the sender failed or is slow, or never started), end the run with a finish."""
        if self.run_id is None or self.ended:
            return
        wait = float(self._option("flush_seconds", 5.0))
        counts = {host: stats.summarize(host) for host in sorted(stats.processed)}
        recap = {host: {
            "ok": c.get("ok", 0), "changed": c.get("changed", 0), "failed": c.get("failures", 0),
            "unreachable": c.get("unreachable", 0), "skipped": c.get("skipped", 0)}
            for host, c in counts.items()}
        if self._send_recap(recap, wait):
            self.ended = True
        else:
            self._finish(status_from_stats(recap))
        if self.process is not None:
            self.process.close()
        self._display.display(f"Marco run: {self.permalink}")

    def _send_recap(self, recap: dict[str, dict[str, int]], wait: float) -> bool:
        """Queue the recap and wait for it; True when the controller took it. Anything short
        of all events is the one warning."""
        sender = self.sender
        if sender is None:
            return False
        queued = sender.failure is None and sender.put(
            {"type": "recap", "stats": recap, "time": time.time()}, wait)
        sent = sender.drain(wait) and queued
        if not sent or sender.dropped:
            reason = sender.failure or (f"{sender.dropped} events did not fit the queue"
                                        if sender.dropped else
                                        f"not all sent within {wait:g} s")
            self._warn_once(f"the run is incomplete ({reason})")
        return sent
