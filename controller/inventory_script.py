"""marco-inventory: Ansible inventory script (`--list`, `--host NAME`) served by the controller.

    MARCO_CONTROLLER=http://controller:7380 MARCO_TOKEN=... ansible-inventory -i marco-inventory --list

The token comes from $MARCO_TOKEN, else the file named by $MARCO_TOKEN_FILE, else the one
`marco login` stores (~/.config/marco/token).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Sequence

from agent.errors import AuthenticationError

from .credentials import find_token

DEFAULT_CONTROLLER = "http://127.0.0.1:7380"


def fetch(url: str, token: str | None) -> object:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as reply:
        return json.load(reply)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="marco-inventory", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--list", action="store_true", help="all groups and hosts (with _meta)")
    group.add_argument("--host", metavar="NAME", help="variables of one host")
    parser.add_argument("--controller", default=os.environ.get("MARCO_CONTROLLER", DEFAULT_CONTROLLER),
                        help=f"controller URL [env MARCO_CONTROLLER] (default {DEFAULT_CONTROLLER})")
    args = parser.parse_args(argv)
    url = args.controller.rstrip("/") + "/api/inventory"
    if args.host:
        url += "?" + urllib.parse.urlencode({"host": args.host})
    try:
        token = find_token()
    except AuthenticationError as error:
        print(f"marco-inventory: {error.message}", file=sys.stderr)
        return 1
    try:
        data = fetch(url, token)
    except urllib.error.HTTPError as error:
        hint = " (log in again: marco login)" if error.code == 401 else ""
        print(f"marco-inventory: {args.controller} answered {error.code}{hint}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as error:
        print(f"marco-inventory: cannot reach the controller at {args.controller}: "
              f"{getattr(error, 'reason', error)}", file=sys.stderr)
        return 1
    json.dump(data, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
