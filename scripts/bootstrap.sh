# Sourced by scripts/demo and scripts/test: install what Marco needs on a fresh Debian machine
# (as root: Debian packages via apt-get) and a virtualenv in .venv with Marco installed.
# Idempotent: a second run only checks.
set -euo pipefail

MARCO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MARCO_VENV:-$MARCO_ROOT/.venv}
# Debian's own Python: every user can execute it (the agent runs helpers as each user).
PYTHON=${MARCO_PYTHON:-$(command -v /usr/bin/python3 || command -v python3)}
DEBIAN_PACKAGES=(python3 python3-venv python3-pip iproute2 procps passwd coreutils login sudo
                 libpam-modules ca-certificates)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

install_debian_packages() {
    command -v dpkg-query >/dev/null || return 0
    local missing=()
    for pkg in "${DEBIAN_PACKAGES[@]}" "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        say "missing Debian packages: ${missing[*]} (run as root, or install them first)"
        return 1
    fi
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV with $PYTHON"
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.marco-installed"
    if [ ! -f "$stamp" ] || [ "$MARCO_ROOT/pyproject.toml" -nt "$stamp" ]; then
        say "installing Marco and its Python dependencies into $VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        # (setuptools warns on every editable install that folders named like the packages
        # take precedence: here they are the packages.)
        PYTHONWARNINGS="ignore:Editable installation" \
            "$VENV/bin/python" -m pip install -q -e "$MARCO_ROOT[test]"
        touch "$stamp"
    fi
    # Other users must reach the venv's Python (file helpers and tests run as them).
    chmod o+rx "$MARCO_ROOT" "$VENV" 2>/dev/null || true
}
