"""`python -m ansible_plugins`: print the folder of the collection marco.fleet shipped in this
package, e.g. `ansible-galaxy collection install "$(python -m ansible_plugins)"`."""

from __future__ import annotations

from ansible_plugins import COLLECTION


def main() -> None:
    print(COLLECTION)


if __name__ == "__main__":
    main()
