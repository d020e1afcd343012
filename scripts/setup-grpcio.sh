#!/usr/bin/env bash
# Installs Python's stock gRPC client (grpcio, from PyPI) into <repo>/.tools/grpcio-venv
# for the integration test that calls the broker the way a Python executor would, and
# prints the path of that venv's python. Test-only: nothing the broker runs uses it.
#
# Idempotent: when the pinned version imports, it only prints the path. Stdout carries
# nothing but that path; everything else goes to stderr.
#
# Env: PYTHON (default python3) picks the interpreter used to create the venv.
set -euo pipefail

readonly GRPCIO_VERSION=1.85.3

repo=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
tools="$repo/.tools"
venv="$tools/grpcio-venv"
python=${PYTHON:-python3}

die() {
    printf 'setup-grpcio: error: %s\n' "$*" >&2
    exit 1
}
say() { printf 'setup-grpcio: %s\n' "$*" >&2; }
# shellcheck source=scripts/venv.sh
source "$repo/scripts/venv.sh"

installed_ok() {
    [[ -x "$venv/bin/python" ]] &&
        [[ "$("$venv/bin/python" -c 'import grpc; print(grpc.__version__)' 2>/dev/null)" == "$GRPCIO_VERSION" ]]
}

mkdir -p "$tools"
exec 9>"$tools/.setup-grpcio.lock"
flock 9

if ! installed_ok; then
    ensure_venv "$python" "$venv"
    say "installing grpcio==$GRPCIO_VERSION"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary :all: \
        "grpcio==$GRPCIO_VERSION" >&2 \
        || die "pip install grpcio==$GRPCIO_VERSION failed (network to PyPI?)"
    installed_ok || die "grpcio $GRPCIO_VERSION is installed in $venv but does not import"
fi
printf '%s\n' "$venv/bin/python"
