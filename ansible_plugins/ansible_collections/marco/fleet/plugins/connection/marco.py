# marco.fleet.marco, the connection: a thin shim (the documentation for ansible-doc); the logic
# is ansible_plugins.core.connection, in the Python package marco (pip install 'marco[ansible]').
from __future__ import annotations

DOCUMENTATION = r"""
name: marco
short_description: Run tasks through Marco agents (mutual TLS) instead of SSH
description:
  - Runs each task's commands on a node's Marco agent, as the Unix user named by your Marco
    token, in one HTTP round trip per command; files travel streamed.
  - Every command's output streams live to the Marco viewer while it runs.
  - Get a token and a client certificate with C(marco login), or set C(MARCO_TOKEN) and
    C(MARCO_CLIENT_CERT)/C(MARCO_CLIENT_KEY)/C(MARCO_TLS_CA).
  - The agent must present a certificate from the cluster CA naming the node; anything else
    (a rogue agent, an expired or revoked certificate) makes the host UNREACHABLE.
author: Marco developers
version_added: "0.1"
options:
  remote_addr:
    description: Address of the node's agent.
    default: inventory_hostname
    type: string
    vars:
      - name: inventory_hostname
      - name: ansible_host
      - name: marco_host
  node_name:
    description: The node name the agent's certificate must carry.
    type: string
    vars:
      - name: inventory_hostname
      - name: marco_node
  tls:
    description:
      - Mutual TLS to the agent. The Marco inventory sets it from what the agent announces
        (off only for agents in C(--dev) mode on loopback).
    type: boolean
    default: true
    vars:
      - name: marco_tls
    env:
      - name: MARCO_TLS
  tls_ca:
    description:
      - The cluster CA file (default; the one C(marco login) stored, else /etc/marco/ca.pem).
    type: path
    vars:
      - name: marco_tls_ca
    env:
      - name: MARCO_TLS_CA
  tls_cert:
    description: Client certificate (default; the one C(marco login) stored).
    type: path
    vars:
      - name: marco_tls_cert
    env:
      - name: MARCO_CLIENT_CERT
  tls_key:
    description: Its private key.
    type: path
    vars:
      - name: marco_tls_key
    env:
      - name: MARCO_CLIENT_KEY
  port:
    description: The agent's TCP port.
    type: int
    default: 7370
    vars:
      - name: ansible_port
      - name: marco_port
    env:
      - name: MARCO_PORT
  marco_token:
    description: The Marco token (from C(marco login) or the controller's C(/api/token)).
    type: string
    vars:
      - name: marco_token
    env:
      - name: MARCO_TOKEN
  marco_token_file:
    description:
      - A file holding the token, used when C(marco_token) is not set.
      - Without either, the token C(marco login) stored (C(~/.config/marco/token)) is used.
    type: path
    vars:
      - name: marco_token_file
    env:
      - name: MARCO_TOKEN_FILE
  timeout:
    description: Seconds to wait to connect to the agent and for each HTTP exchange.
    type: int
    default: 30
    ini:
      - section: defaults
        key: timeout
    env:
      - name: ANSIBLE_TIMEOUT
    vars:
      - name: ansible_timeout
      - name: marco_timeout
  command_timeout:
    description: Seconds a single command may run before the agent stops it (0 = no limit).
    type: int
    default: 0
    vars:
      - name: marco_command_timeout
    env:
      - name: MARCO_COMMAND_TIMEOUT
  runner:
    description:
      - Let the agent run pipelined modules in its warm module runner (a Python process per
        user that keeps ansible-core's module_utils imported and forks a fresh child per task)
        instead of a new interpreter each. Tasks with C(become) always get a new interpreter.
        C(-vvv) shows which path each command took (C(MARCO RUNNER runner|process)).
    type: boolean
    default: true
    vars:
      - name: marco_runner
    env:
      - name: MARCO_RUNNER
  tmp_shortcuts:
    description:
      - Answer Ansible's C(echo ~) from the home the agent named in this task's previous answer,
        and make the remote tmp with the first upload into it (C(PUT /v1/files?mkdir=true))
        instead of a separate C(mkdir) command, so a C(copy) or C(template) task needs two
        fewer commands on the node. Only commands this connection's shell plugin generated
        with plain paths are taken; any other command first runs the deferred C(mkdir).
        C(-vvv) shows each in a C(MARCO TMP) line.
    type: boolean
    default: true
    vars:
      - name: marco_tmp_shortcuts
    env:
      - name: MARCO_TMP_SHORTCUTS
  mux:
    description:
      - Reach the agents through C(marco-mux), a process per Unix user on this machine (like
        ssh ControlPersist) that keeps each agent's mutual-TLS connection open between tasks,
        so a task pays no TLS handshake. It starts on first use and exits after
        C(MARCO_MUX_IDLE_SECONDS) (default 60) without a client. Its socket is
        C($XDG_RUNTIME_DIR/marco/mux.sock), else C(~/.marco/run/mux.sock), reachable by your
        user only; it keeps no token (each call carries yours).
      - If it cannot be started or reached, the connection talks to the agent directly;
        C(-vvv) shows which, and why, in a C(MARCO MUX) line per task.
    type: boolean
    default: true
    vars:
      - name: marco_mux
    env:
      - name: MARCO_MUX
  play_name:
    description:
      - Set by Ansible (C(ansible_play_name)); labels each execution with its play in the viewer.
    type: string
    vars:
      - name: ansible_play_name
  pipelining:
    description: Send modules as stdin (one round trip per task). On by default for Marco.
    type: boolean
    default: true
    vars:
      - name: ansible_pipelining
      - name: marco_pipelining
    env:
      - name: MARCO_PIPELINING
"""

EXAMPLES = r"""
# Usually set by the marco.fleet.marco inventory for every node; by hand:
#   ansible -i 192.0.2.11, all -c marco.fleet.marco -e marco_node=web1 -m ansible.builtin.ping
- name: Through the Marco agents
  hosts: web
  vars:
    ansible_connection: marco.fleet.marco
  tasks:
    - name: Who am I on the node
      ansible.builtin.command: id -un
      changed_when: false
"""

from ansible_plugins.core.connection import MarcoConnection  # noqa: E402


class Connection(MarcoConnection):
    """Ansible finds plugins by this class name (and derives the plugin type from it)."""
