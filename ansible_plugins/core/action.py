"""The `marco.fleet.marco_deploy` action: upload `src` to `dest` and run `command` directly on
the node's agent (`deploy.deploy`), so its lines stream to the viewer while it runs."""

from __future__ import annotations

from ansible.errors import AnsibleActionFail, AnsibleError
from ansible.module_utils.parsing.convert_bool import boolean
from ansible.plugins.action import ActionBase

from marco.errors import MarcoError

from .connection import MarcoConnection
from .deploy import DeployError, deploy
from .errors import to_ansible


class MarcoDeployAction(ActionBase):
    """Upload `src` to `dest` and run `command` on the agent, its output live in the viewer."""

    TRANSFERS_FILES = True
    _VALID_ARGS = frozenset(("src", "dest", "overwrite", "mode", "command", "chdir", "creates"))

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        args = self._task.args
        if not isinstance(self._connection, MarcoConnection):
            raise AnsibleActionFail("marco_deploy needs the marco connection "
                                    "(ansible_connection: marco.fleet.marco)")
        if not args.get("src") and not args.get("command"):
            raise AnsibleActionFail("give src, command, or both")
        src = self._find_needle("files", args["src"]) if args.get("src") else None
        self._connection._connect()
        label = self._connection._label()
        try:
            result.update(deploy(
                self._connection._client, src, args.get("dest") or "~",
                boolean(args.get("overwrite", True), strict=False), args.get("mode"),
                args.get("command"), args.get("chdir"), args.get("creates"), label,
                check_mode=self._task.check_mode, no_log=bool(self._task.no_log),
                tags=self._connection._tags()))
        except DeployError as error:
            raise AnsibleActionFail(str(error)) from None
        except MarcoError as error:
            raise to_ansible(error, self._connection._host, "marco_deploy") from None
        except AnsibleError:
            raise
        return result
