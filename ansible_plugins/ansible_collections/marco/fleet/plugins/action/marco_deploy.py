# marco.fleet.marco_deploy, the action: a thin shim; the logic is ansible_plugins.core.action, in
# the Python package marco (pip install 'marco[ansible]'). Its documentation is the stub in
# plugins/modules/marco_deploy.py.
from __future__ import annotations

from ansible_plugins.core.action import MarcoDeployAction


class ActionModule(MarcoDeployAction):
    """Ansible finds action plugins by this class name."""
