# marco.fleet.marco_runs, the callback: a thin shim (the documentation for ansible-doc); the logic
# is ansible_plugins.core.runs_callback, in the Python package marco (pip install 'marco[ansible]').
from __future__ import annotations

DOCUMENTATION = r"""
name: marco_runs
type: notification
short_description: Record each ansible-playbook invocation as a run on the Marco controller
description:
  - Registers the playbook as a run with the Marco controller at its start (with your
    C(marco login) credentials, or C(MARCO_TOKEN)), then sends play and task starts, each
    host's result (status, a short message, rc, duration and the result without its
    C(invocation)) and the recap. The run's page shows a tasks x hosts grid that fills live.
  - "A C(no_log) task's result is sent as C(output hidden: no_log) and nothing else."
  - The marco connection tags every execution with the run, the task and the host
    (C(MARCO_RUN) in the environment), so the live lines of a task land in its cell.
  - Events are queued and sent by one background thread, so a task never waits for the
    controller. A controller that cannot be reached (or no credentials) costs one warning;
    the playbook goes on unrecorded.
  - The run's permalink is printed at the end.
author: Marco developers
version_added: "0.1"
requirements:
  - enable in ansible.cfg (C(callbacks_enabled = marco.fleet.marco_runs))
options:
  enabled:
    description: Record runs; false leaves this invocation unrecorded (the callback stays
      enabled in ansible.cfg).
    type: bool
    default: true
    env:
      - name: MARCO_RUNS_ENABLED
    ini:
      - section: callback_marco_runs
        key: enabled
  controller:
    description: URL of the Marco controller (default the one C(marco login) used).
    type: string
    env:
      - name: MARCO_CONTROLLER
    ini:
      - section: callback_marco_runs
        key: controller
  timeout:
    description: Seconds to wait for the controller to register the run, and for each batch
      of events.
    type: float
    default: 5.0
    env:
      - name: MARCO_RUNS_TIMEOUT
    ini:
      - section: callback_marco_runs
        key: timeout
  flush_seconds:
    description: At the end, the longest wait for the events still queued to be sent.
    type: float
    default: 5.0
    env:
      - name: MARCO_RUNS_FLUSH_SECONDS
    ini:
      - section: callback_marco_runs
        key: flush_seconds
  max_queued_events:
    description: Events waiting to be sent at most; more are dropped (and the run is
      reported incomplete).
    type: int
    default: 10000
    env:
      - name: MARCO_RUNS_MAX_QUEUED_EVENTS
    ini:
      - section: callback_marco_runs
        key: max_queued_events
"""

from ansible_plugins.core.runs_callback import MarcoRunsCallback  # noqa: E402


class CallbackModule(MarcoRunsCallback):
    """Ansible finds plugins by this class name."""
