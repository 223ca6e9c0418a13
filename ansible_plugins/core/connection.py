"""The `marco` connection: Ansible tasks through a Marco agent instead of SSH.

One HTTP round trip per command (`POST /v1/executions?wait=1`, module payload as stdin), files
streamed with `PUT`/`GET /v1/files`. Every execution is labelled with play, task and host, so
the live viewer groups it, and it runs as the token's user on the node. When the playbook is
recorded as a run (the `marco.fleet.marco_runs` callback sets MARCO_RUN in ansible-playbook,
whose forked workers inherit it), every execution is also tagged with the run, the task's id
and the host, so the run's page puts its live lines in that task x host cell.
"""

from __future__ import annotations

import os
import typing as t

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

from marco.client import AgentClient
from marco.credentials import find_token, node_tls
from marco.errors import AuthenticationError, MarcoError
from marco.mux_client import MuxClient
from marco.protocol import MAX_LABEL_CHARS
from marco.tls import ClientTls

from .errors import to_ansible
from .remote_tmp import RemoteTmp

display = Display()

RUN_VARIABLE = "MARCO_RUN"  # the run id, set by the marco_runs callback at playbook start
TAG_VALUE_CHARS = 200       # the agent's limit on a tag's value (docs/protocol.md)



def _shortened(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[:limit - 1] + "…"

class MarcoConnection(ConnectionBase):
    """Run commands and move files through a Marco agent."""

    transport = "marco.fleet.marco"
    has_pipelining = True
    _connected: bool  # ConnectionBase's, untyped there
    has_tty = False

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self._client: AgentClient | MuxClient | None = None
        self._sudo_needs_password: bool | None = None
        self._task_name = ""
        self._play_name = ""
        self._host_name = ""
        # The worker's TaskExecutor names its task when it makes the connection: the same
        # id the callback sends as the task's `task_id`.
        self._task_uuid = str(kwargs.get("task_uuid") or "")
        # Wraps this connection's own shell plugin, made by ConnectionBase above.
        self._tmp = RemoteTmp(self._shell)

    # -- options and labels -------------------------------------------------------------------

    def set_options(self, task_keys: dict[str, t.Any] | None = None,
                    var_options: dict[str, t.Any] | None = None,
                    direct: dict[str, t.Any] | None = None) -> None:
        super().set_options(task_keys=task_keys, var_options=var_options, direct=direct)
        if task_keys:
            self._task_name = str(task_keys.get("name") or task_keys.get("action") or "")
        if var_options:
            self._host_name = str(var_options.get("inventory_hostname") or "")
        self._play_name = str(self.get_option("play_name") or "")
        self._tmp.enabled = bool(self.get_option("tmp_shortcuts"))

    def _label(self) -> str:
        """`play / task @ host` within the agent's limit: a long play name is shortened
        first, so the task stays findable (the viewer groups by it)."""
        suffix = f" @ {self._host_name}" if self._host_name else ""
        task = f" / {self._task_name}" if self._play_name and self._task_name else ""
        play = self._play_name or self._task_name or "ansible"
        room = MAX_LABEL_CHARS - len(suffix) - len(task)
        if len(play) > room:
            play = play[:max(room - 1, 0)] + "…"
        return _shortened(play + task, MAX_LABEL_CHARS - len(suffix)) + suffix

    def _tags(self) -> dict[str, str] | None:
        """The run tags of this task's executions; None outside a recorded run."""
        run = os.environ.get(RUN_VARIABLE, "")
        if not run:
            return None
        tags = {"run": run, "task": self._task_uuid, "host": self._host_name}
        return {key: value[:TAG_VALUE_CHARS] for key, value in tags.items() if value}

    @property
    def _host(self) -> str:
        return str(self.get_option("remote_addr"))

    # -- connection ---------------------------------------------------------------------------

    def _connect(self) -> MarcoConnection:
        if self._connected and self._client is not None:
            return self
        environ = dict(os.environ)
        for option, variable in (("tls_ca", "MARCO_TLS_CA"), ("tls_cert", "MARCO_CLIENT_CERT"),
                                 ("tls_key", "MARCO_CLIENT_KEY")):
            if self.get_option(option):
                environ[variable] = str(self.get_option(option))
        try:
            token = find_token(self.get_option("marco_token"), self.get_option("marco_token_file"))
            tls = node_tls(bool(self.get_option("tls")), self._host, environ)
        except AuthenticationError as error:
            raise to_ansible(error, self._host, "login") from None
        except MarcoError as error:
            raise to_ansible(error, self._host, "connect") from None
        port = int(self.get_option("port"))
        node = str(self.get_option("node_name") or self._host)
        display.vvv(f"ESTABLISH MARCO CONNECTION TO {node} at {self._host}:{port} "
                    f"({'mutual TLS' if tls else 'plain HTTP, --dev agent'})", host=self._host)
        self._client = self._agent_client(token, port, node, tls)
        self._connected = True
        return self

    def _agent_client(self, token: str, port: int, node: str,
                      tls: ClientTls | None) -> AgentClient | MuxClient:
        """Through the user's marco-mux, which keeps the agent connection between tasks (no
        TLS handshake per task), unless it is switched off or cannot be had: then directly."""
        timeout = float(self.get_option("timeout"))
        if not self.get_option("mux"):
            display.vvv("MARCO MUX: direct (mux off)", host=self._host)
        else:
            try:
                # No mux yet: this task goes direct while one starts for the next tasks.
                client = MuxClient.open(self._host, port, token, timeout=timeout, tls=tls,
                                        node=node, start="background")
            except MarcoError as error:
                display.vvv(f"MARCO MUX: direct ({error.message})", host=self._host)
            else:
                try:
                    if self._tmp.enabled:  # for this task's `echo ~` (remote_tmp.py)
                        self._tmp.learn(*client.known_home())
                except MarcoError as error:
                    client.close()
                    display.vvv(f"MARCO MUX: direct ({error.message})", host=self._host)
                else:
                    display.vvv(f"MARCO MUX: via mux (pid {client.pid})", host=self._host)
                    return client
        return AgentClient(self._host, port, token, node=node, tls=tls, timeout=timeout)

    def exec_command(self, cmd: str, in_data: bytes | None = None,
                     sudoable: bool = True) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        self._connect()
        assert self._client is not None
        shortcut = self._tmp.answer(to_text(cmd), in_data, becoming=bool(sudoable and self.become))
        if shortcut is not None:
            (rc, out, err), note = shortcut
            display.vvv(f"EXEC {to_text(cmd)}", host=self._host)
            display.vvv(f"MARCO TMP: {note}", host=self._host)
            return rc, out, err
        self._make_deferred_tmp(to_text(cmd), in_data)
        stdin = in_data or b""
        if sudoable and self.become and self.become.expect_prompt() and self._sudo_wants_password():
            # sudo -S reads the password as the first line of stdin, then the payload follows.
            password = self.become.get_option("become_pass", playcontext=self._play_context)
            stdin = to_bytes(password or "") + b"\n" + stdin
        display.vvv(f"EXEC {to_text(cmd)}", host=self._host)
        runner, why_not = self._runner_wanted(sudoable)
        try:
            # A no_log task's module result carries its arguments: the agent keeps and streams
            # nothing of it, and only this caller gets the output.
            result = self._client.run(to_text(cmd), stdin=stdin, label=self._label(),
                                      timeout=self.get_option("command_timeout") or None,
                                      no_log=bool(self._play_context.no_log),
                                      tags=self._tags(), runner=runner)
        except MarcoError as error:
            raise to_ansible(error, self._host, "exec") from None
        self._tmp.learn(result.user, result.home)
        display.vvv(f"MARCO RUNNER {result.via}: {why_not or result.runner_note}",
                    host=self._host)
        if result.timed_out:
            raise AnsibleError(f"command on {self._host} ran longer than "
                               f"{self.get_option('command_timeout')} s and was stopped")
        if result.stdout_truncated or result.stderr_truncated:
            # A cut module result would fail later as unreadable JSON, or pass as a wrong one.
            raise AnsibleError(f"the output of the command on {self._host} was cut by the agent "
                               "(its capture limit, or your disk budget on that node is used "
                               "up by running executions): the result is not complete")
        rc = result.rc if result.rc is not None else 128 + _signal_number(result.signal)
        stderr = result.stderr
        if sudoable and self.become and self.become.expect_prompt() and rc != 0 \
                and b"incorrect password" in stderr.lower() + result.stdout.lower():
            raise AnsibleError(f"become on {self._host}: sudo refused the password")
        if sudoable and self.become and rc != 0 and not _is_sudo(self.become) \
                and self.become.check_password_prompt(stderr + result.stdout):
            # Without a password to send, su read the module's first line as one and failed.
            raise AnsibleError(_needs_terminal(self.become))
        return rc, result.stdout, stderr

    def _make_deferred_tmp(self, text: str, data: bytes | None = None) -> None:
        """Run the remote tmp's real `mkdir`, deferred by RemoteTmp, before a command (`text`,
        stdin `data`) or a file path that names the tmp reaches the node."""
        command = self._tmp.deferred_command(text, data)
        if command is None:
            return
        assert self._client is not None
        display.vvv(f"MARCO TMP: making the deferred tmp first: {command}", host=self._host)
        try:
            result = self._client.run(command, label=self._label(), tags=self._tags(),
                                      runner=self._runner_wanted(False)[0])
        except MarcoError as error:
            raise to_ansible(error, self._host, "exec") from None
        if result.rc != 0:
            detail = to_text(result.stderr or result.stdout).strip()
            raise AnsibleConnectionFailure(
                f"Failed to create temporary directory on {self._host}: {command} exited with "
                f"{result.rc}: {detail}")

    def _runner_wanted(self, sudoable: bool) -> tuple[bool, str]:
        """May the agent's module runner run this command, and if not, why (for -vvv)? A
        runner runs as the token's user: a command under become needs a new process."""
        if not self.get_option("runner"):
            return False, "runner off"
        if sudoable and self.become:
            return False, "become"
        return True, ""

    def _sudo_wants_password(self) -> bool:
        """Will sudo ask for the password? Only then may it go first on stdin: with a NOPASSWD
        rule sudo never reads it, and the module would read the password as its code."""
        assert self._client is not None and self.become is not None
        if not _is_sudo(self.become):
            raise AnsibleError(_needs_terminal(self.become))
        if self._sudo_needs_password is None:
            user = self.become.get_option("become_user") or "root"
            try:
                probe = self._client.run(["sudo", "-n", "-u", str(user), "true"],
                                         label=f"{self._label()} (sudo -n probe)",
                                         tags=self._tags())
            except MarcoError as error:
                raise to_ansible(error, self._host, "sudo probe") from None
            self._sudo_needs_password = probe.rc != 0
        return self._sudo_needs_password

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        self._connect()
        assert self._client is not None
        display.vvv(f"PUT {in_path} TO {out_path}", host=self._host)
        if not os.path.exists(to_bytes(in_path, errors="surrogate_or_strict")):
            raise AnsibleFileNotFound(f"file or module does not exist: {in_path}")
        mkdir = self._tmp.upload_makes_tmp(to_text(out_path))
        if mkdir:
            display.vvv("MARCO TMP: this upload makes the deferred tmp", host=self._host)
        else:
            self._make_deferred_tmp(to_text(out_path))
        try:
            with open(to_bytes(in_path, errors="surrogate_or_strict"), "rb") as source:
                self._client.put_file(source, to_text(out_path),
                                      size=os.fstat(source.fileno()).st_size, mkdir=mkdir)
        except MarcoError as error:
            raise to_ansible(error, self._host, f"put {out_path}") from None

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        self._connect()
        assert self._client is not None
        display.vvv(f"FETCH {in_path} TO {out_path}", host=self._host)
        self._make_deferred_tmp(to_text(in_path))
        target = to_bytes(out_path, errors="surrogate_or_strict")
        partial = target + b".marco-partial"
        try:
            with open(partial, "wb") as destination:
                self._client.get_file(to_text(in_path), destination)
            os.replace(partial, target)
        except MarcoError as error:
            raise to_ansible(error, self._host, f"fetch {in_path}") from None
        finally:
            if os.path.exists(partial):
                os.unlink(partial)

    def reset(self) -> None:
        self.close()
        self._connect()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._connected = False


def _is_sudo(become: t.Any) -> bool:
    return str(getattr(become, "name", "")).rsplit(".", 1)[-1] == "sudo"


def _needs_terminal(become: t.Any) -> str:
    method = str(getattr(become, "name", "")).rsplit(".", 1)[-1]
    return (f"become method {method!r} needs a terminal to answer its password prompt, which "
            "the marco connection does not have; use sudo")


def _signal_number(name: str | None) -> int:
    import signal
    try:
        return int(signal.Signals[name]) if name else 0
    except KeyError:
        return 0
