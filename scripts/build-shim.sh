#!/usr/bin/env bash
# Builds turnstile-shim as a fully static binary and prints its path.
#
# The shim is bind-mounted into jails whose rootfs is whatever the host has, and it is
# PID 1 there: it must not depend on the jail's dynamic loader or libc. glibc's
# +crt-static gives a static-pie binary. The explicit --target matters: with it, cargo
# applies RUSTFLAGS to the target only, not to build scripts and proc-macros (which must
# stay dynamic to be loadable by rustc).
#
# Extra arguments go to cargo (e.g. --locked, -q). Stdout carries only the binary's path.
set -euo pipefail

readonly TARGET=x86_64-unknown-linux-gnu
readonly PROFILE=shim # [profile.shim] in the workspace Cargo.toml

repo=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
bin="${CARGO_TARGET_DIR:-$repo/target}/$TARGET/$PROFILE/turnstile-shim"

die() {
    printf 'build-shim: error: %s\n' "$*" >&2
    exit 1
}

command -v cargo >/dev/null || die "cargo not found"
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$TARGET"; then
    die "rust target $TARGET is not installed (rustup target add $TARGET)"
fi

cd "$repo"
# CARGO_ENCODED_RUSTFLAGS would silently win over RUSTFLAGS and drop crt-static.
unset CARGO_ENCODED_RUSTFLAGS
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
    cargo build -p turnstile-shim --profile "$PROFILE" --target "$TARGET" "$@" >&2 \
    || die "cargo build of turnstile-shim failed"

[[ -f "$bin" ]] || die "cargo succeeded but $bin does not exist"

# Static means: no program interpreter (PT_INTERP) and no shared-library dependencies
# (DT_NEEDED). Note `file` says "static-pie linked" for Rust's default static-pie output,
# not "statically linked", and ldd says "statically linked" for it.
desc=$(file -b "$bin" 2>/dev/null || true)
if command -v readelf >/dev/null; then
    if readelf -lW "$bin" | grep -q 'INTERP' || readelf -dW "$bin" | grep -q '(NEEDED)'; then
        readelf -dW "$bin" | grep '(NEEDED)' >&2 || true
        die "$bin is dynamically linked ($desc)"
    fi
elif [[ -n "$desc" ]]; then
    [[ "$desc" == *"statically linked"* || "$desc" == *"static-pie linked"* ]] \
        || die "$bin is not statically linked: $desc"
else
    ldd "$bin" 2>&1 | grep -Eq 'not a dynamic executable|statically linked' \
        || die "$bin is not statically linked: $(ldd "$bin" 2>&1)"
fi

printf 'build-shim: %s (%s bytes, %s)\n' "$bin" "$(stat -c %s "$bin")" \
    "${desc:-static}" >&2
printf '%s\n' "$bin"
