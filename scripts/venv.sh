# Sourced by the setup scripts: `ensure_venv PYTHON VENV` makes VENV with PYTHON unless
# a working one is there. Debian splits venv/ensurepip into python3-venv; when apt's own
# python lacks it and we are root, it is installed with apt-get. Uses the caller's `say`
# and `die`.

ensure_venv() {
    local python=$1 venv=$2
    if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import sys' 2>/dev/null; then
        return 0
    fi
    command -v "$python" >/dev/null || die "$python not found (set PYTHON=/path/to/python3)"
    say "creating venv $venv"
    if "$python" -m venv --clear "$venv" >/dev/null 2>&1; then
        return 0
    fi
    if [[ "$(command -v "$python")" == /usr/bin/* ]] && command -v apt-get >/dev/null \
        && [[ $(id -u) -eq 0 ]]; then
        say "python3 -m venv failed; installing python3-venv with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >&2 \
            || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -q python3-venv >&2; } \
            || die "apt-get install python3-venv failed"
        "$python" -m venv --clear "$venv" >/dev/null 2>&1 \
            || die "'$python -m venv $venv' failed even with python3-venv installed"
    else
        die "'$python -m venv $venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
    fi
}
