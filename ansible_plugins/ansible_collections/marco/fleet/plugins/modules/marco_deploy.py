#!/usr/bin/python
# Documentation stub: marco.fleet.marco_deploy is an action plugin (plugins/action/marco_deploy.py)
# that works on the controller side; this file only carries its documentation for ansible-doc.
from __future__ import annotations

DOCUMENTATION = r"""
module: marco_deploy
short_description: Deploy a file to a folder and run a command there, output live in Marco's viewer
description:
  - Uploads O(src) into the folder O(dest) on the node (streamed, atomic, as your Marco user),
    then runs O(command) directly on the node's Marco agent.
  - Unlike ordinary modules, which report only at their end, the command's output streams
    line by line to the Marco viewer (and every socket of your user) while it runs.
  - The result looks like M(ansible.builtin.command)'s.
  - "Needs the P(marco.fleet.marco#connection) connection
    (C(ansible_connection: marco.fleet.marco))."
version_added: "0.1"
author: Marco developers
options:
  src:
    description: Local file to upload (searched like M(ansible.builtin.copy) does, in C(files/)).
    type: path
  dest:
    description: Folder on the node, C(~)-relative or absolute.
    type: str
    default: "~"
  overwrite:
    description: Replace an existing file. When false, an existing file is kept.
    type: bool
    default: true
  mode:
    description: Octal mode of the uploaded file, e.g. C('0755').
    type: raw
  command:
    description: Shell command to run after the upload.
    type: str
  chdir:
    description: Folder to run the command in (default O(dest)).
    type: str
  creates:
    description: If this path exists on the node, the command is not run.
    type: str
notes:
  - At least one of O(src) and O(command) is required.
"""

EXAMPLES = r"""
- name: Build the project, output live in the viewer
  marco.fleet.marco_deploy:
    src: build.sh
    dest: ~/project
    mode: "0755"
    command: ./build.sh
"""

RETURN = r"""
dest:
  description: Path of the uploaded file.
  returned: when src is given
  type: str
rc:
  description: Exit code of the command.
  returned: when the command ran
  type: int
stdout:
  description: Standard output of the command.
  returned: when the command ran
  type: str
stderr:
  description: Standard error of the command.
  returned: when the command ran
  type: str
start:
  description: When the command started.
  returned: when the command ran
  type: str
end:
  description: When the command ended.
  returned: when the command ran
  type: str
delta:
  description: How long the command ran.
  returned: when the command ran
  type: str
"""

if __name__ == "__main__":
    import json
    import sys

    print(json.dumps({"failed": True, "msg": "marco_deploy runs as an action plugin: call it as "
                      "marco.fleet.marco_deploy with the collection marco.fleet installed"}))
    sys.exit(1)
