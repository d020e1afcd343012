#!/usr/bin/env bash
# Installs the Python client (clients/python) and its check tools (pinned in
# clients/python/requirements-dev.txt) into <repo>/.tools/venv and prints the venv's
# python. Needs only PyPI: grpcio, protobuf and the tools come as wheels.
#
# The package is installed as a user would (`pip install ./clients/python`, not
# editable), anew on every run, so the checks see what a fresh install gives.
# Stdout carries nothing but the interpreter's path, so
# `PY=$(scripts/setup-python.sh)` works; everything else goes to stderr.
#
# Env: PYTHON (default python3) picks the interpreter used to create the venv.
set -euo pipefail

repo=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
tools="$repo/.tools"
venv="$tools/venv"
python=${PYTHON:-python3}

die() {
    printf 'setup-python: error: %s\n' "$*" >&2
    exit 1
}
say() { printf 'setup-python: %s\n' "$*" >&2; }
# shellcheck source=scripts/venv.sh
source "$repo/scripts/venv.sh"

mkdir -p "$tools"
exec 9>"$tools/.setup-python.lock"
flock 9

command -v "$python" >/dev/null || die "$python not found (set PYTHON=/path/to/python3)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$python is older than 3.10, which the client needs (set PYTHON=/path/to/python3)"

ensure_venv "$python" "$venv"

pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)
say "installing the check tools (clients/python/requirements-dev.txt)"
"${pip[@]}" install -r "$repo/clients/python/requirements-dev.txt" >&2 \
    || die "pip install -r clients/python/requirements-dev.txt failed (network to PyPI?)"
say "installing ./clients/python"
"${pip[@]}" install --force-reinstall --no-deps "$repo/clients/python" >&2 \
    && "${pip[@]}" install "$repo/clients/python" >&2 \
    || die "pip install ./clients/python failed"

printf '%s\n' "$venv/bin/python"
