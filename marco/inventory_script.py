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
from typing import Any, Sequence

from marco.errors import AgentUnreachable, AuthenticationError, MarcoError

from .credentials import controller_context, find_token

DEFAULT_CONTROLLER = "https://127.0.0.1:7380"


def fetch_inventory(controller: str, token: str, host: str | None = None,
                    timeout: float = 30.0) -> Any:
    """The controller's `--list` JSON (or one host's variables), errors typed by cause."""
    url = controller.rstrip("/") + "/api/inventory"
    if host is not None:
        url += "?" + urllib.parse.urlencode({"host": host})
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout,
                                    context=controller_context(controller)) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as error:
        if error.code == 401:
            raise AuthenticationError(f"{controller} answered 401: it refused the token; "
                                      "log in again: marco login") from None
        raise MarcoError(f"{controller} answered {error.code}") from None
    except (urllib.error.URLError, OSError) as error:
        raise AgentUnreachable(f"cannot reach the controller at {controller}: "
                               f"{getattr(error, 'reason', error)}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="marco-inventory", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--list", action="store_true", help="all groups and hosts (with _meta)")
    group.add_argument("--host", metavar="NAME", help="variables of one host")
    parser.add_argument("--controller", default=os.environ.get("MARCO_CONTROLLER", DEFAULT_CONTROLLER),
                        help=f"controller URL [env MARCO_CONTROLLER] (default {DEFAULT_CONTROLLER})")
    args = parser.parse_args(argv)
    try:
        data = fetch_inventory(args.controller, find_token(), args.host)
    except MarcoError as error:
        print(f"marco-inventory: {error.message}", file=sys.stderr)
        return 1
    json.dump(data, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
