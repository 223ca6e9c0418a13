"""marco-inventory: Ansible inventory script (`--list`, `--host NAME`) served by the controller.

    MARCO_CONTROLLER=http://controller:7380 MARCO_TOKEN=... \
        ansible-inventory -i marco-inventory --list

The token comes from $MARCO_TOKEN, else the file named by $MARCO_TOKEN_FILE, else the one
`marco login` stores (~/.config/marco/token).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
from collections.abc import Sequence
from typing import Any

from .agent_api import DEFAULT_TIMEOUT
from .controller_client import call_controller
from .credentials import find_token
from .errors import MarcoError

DEFAULT_CONTROLLER = "https://127.0.0.1:7380"


def fetch_inventory(controller: str, token: str, host: str | None = None,
                    timeout: float = DEFAULT_TIMEOUT) -> Any:
    """The controller's `--list` JSON (or one host's variables), errors typed by cause."""
    query = f"?{urllib.parse.urlencode({'host': host})}" if host is not None else ""
    return call_controller(controller, "/api/inventory" + query, token, timeout=timeout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="marco-inventory", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--list", action="store_true", help="all groups and hosts (with _meta)")
    group.add_argument("--host", metavar="NAME", help="variables of one host")
    parser.add_argument("--controller",
                        default=os.environ.get("MARCO_CONTROLLER", DEFAULT_CONTROLLER),
                        help=f"controller URL [env MARCO_CONTROLLER] "
                             f"(default {DEFAULT_CONTROLLER})")
    args = parser.parse_args(argv)
    try:
        data = fetch_inventory(args.controller, find_token(), args.host)
    except MarcoError as error:
        print(f"marco-inventory: {error}", file=sys.stderr)
        return 1
    json.dump(data, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
