#!/usr/bin/env bash
# Checks a jail profile for real: renders a per-turn copy the way the broker does (the
# profile + the per-turn appendix), runs /bin/sh in it under nsjail, and checks the jail
# from inside and outside. Optionally times raw spawns of /bin/true.
#
#   sudo scripts/check-jail-config.sh [jail-configs/agent.cfg] [--bench N]
#
# Needs root (uid mapping to an arbitrary outside uid) and nsjail (NSJAIL, else
# scripts/setup-nsjail.sh). Exit status: 0 when every check passes.
set -euo pipefail

repo=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cfg="$repo/jail-configs/agent.cfg"
bench=0
while (($#)); do
    case "$1" in
    --bench) bench=${2:?--bench needs a count}; shift 2 ;;
    -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
    *) cfg=$1; shift ;;
    esac
done

readonly OUTSIDE_ID=100000 # what the broker would allocate; any unused uid works
die() { printf 'check-jail-config: error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root"
[[ -f "$cfg" ]] || die "no such profile: $cfg"
nsjail=${NSJAIL:-$("$repo/scripts/setup-nsjail.sh")}

fails=0
ok() { printf 'ok    %s\n' "$1"; }
fail() { printf 'FAIL  %s\n' "$1"; fails=$((fails + 1)); }

# 1. The profile must not set anything the broker appends (protobuf text rejects a
#    repeated scalar; a second mount of the same path would stack).
body=$(sed -e 's/#.*$//' "$cfg")
dups=0
for field in exec_bin cwd time_limit uidmap gidmap log_fd log_file; do
    if grep -Eq "(^|[[:space:]{])$field[[:space:]]*[:{]" <<<"$body"; then
        fail "profile sets per-turn field '$field'"; dups=1
    fi
done
for dst in /home/agent /work; do
    if grep -Eq "dst:[[:space:]]*\"$dst/?\"" <<<"$body"; then
        fail "profile mounts per-turn path $dst"; dups=1
    fi
done
((dups)) || ok "profile sets no per-turn field"

# 2. A turn's host side, as the broker lays it out.
tmp=$(mktemp -d /tmp/turnstile-jailcheck.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/home" "$tmp/work" "$tmp/turn"
chown "$OUTSIDE_ID:$OUTSIDE_ID" "$tmp/home" "$tmp/work"
chmod 755 "$tmp"
printf 'payload' >"$tmp/turn/init.msgpack"

render() { # render OUT EXEC_BIN_LINE
    cp "$cfg" "$1"
    cat >>"$1" <<EOF

# ---- per turn (appended by the broker) ----
$2
cwd: "/work"
time_limit: 60
uidmap { inside_id: "1000" outside_id: "$OUTSIDE_ID" count: 1 }
gidmap { inside_id: "1000" outside_id: "$OUTSIDE_ID" count: 1 }
mount { src: "$tmp/home" dst: "/home/agent" is_bind: true rw: true }
mount { src: "$tmp/work" dst: "/work" is_bind: true rw: true }
pass_fd: 6
log_fd: 5
EOF
}

# 3. Checks from inside (POSIX sh: the jail's /bin/sh is dash on Debian). The turn dir is
#    not mounted: it reaches the jail's init as fd 6 (the broker's shim reaches llm.sock
#    as /proc/self/fd/6/llm.sock), so no mountinfo entry names its host path.
cat >"$tmp/turn/inside.sh" <<'EOF'
c() { if eval "$2" >/dev/null 2>&1; then echo "ok    $1"; else echo "FAIL  $1"; fi; }
c "uid 1000, gid 1000"           '[ "$(id -u):$(id -g)" = 1000:1000 ]'
c "uid_map is 1000 100000 1"     '[ "$(tr -s " " </proc/self/uid_map)" = " 1000 100000 1" ]'
c "only lo in /proc/net/dev"     '[ "$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d " ")" = lo ]'
c "hostname is turnstile"        '[ "$(cat /proc/sys/kernel/hostname)" = turnstile ]'
c "cwd is /work"                 '[ "$(pwd)" = /work ]'
c "/home/agent writable"         'touch /home/agent/from-jail'
c "/work writable"               'touch /work/from-jail'
c "/tmp writable"                'touch /tmp/x'
c "/ read-only"                  '! touch /x'
c "/etc read-only"               '! touch /etc/x'
c "/usr read-only"               '! touch /usr/x'
c "turn dir not mounted"         '[ ! -e /run/turnstile ]'
c "turn dir reachable by fd 6"   'ls /proc/self/fd/6/ | grep -q init.msgpack'
c "turn dir not writable by fd"  '! touch /proc/self/fd/6/x'
c "/bin/sh runs"                 '/bin/sh -c true'
# `find -type c` would trust readdir's d_type, which describes the mountpoint file in
# the root tmpfs (regular), not the device bound over it: test each entry instead.
devs() { for f in /dev/* /dev/.[!.]*; do [ -c "$f" ] && [ ! -L "$f" ] && printf '%s ' "$f"; done; }
others() { for f in /dev/* /dev/.[!.]*; do [ -e "$f" ] || [ -L "$f" ] || continue; [ -c "$f" ] || [ -L "$f" ] || printf '%s ' "$f"; done; }
c "device nodes: null random urandom zero" '[ "$(devs)" = "/dev/null /dev/random /dev/urandom /dev/zero " ]'
c "nothing else in /dev but symlinks" '[ -z "$(others)" ]'
c "write to /dev/null"           'echo x >/dev/null'
c "read /dev/urandom"            '[ "$(head -c 8 /dev/urandom | wc -c)" = 8 ]'
c "/proc/1/environ empty"        '[ ! -s /proc/1/environ ]'
c "environment empty"            '[ -z "$(env | grep -v -e ^PWD= -e ^SHLVL= -e ^_= -e ^OLDPWD=)" ]'
c "fd 3, 4 and 6 passed"        '[ -e /proc/self/fd/3 ] && [ -e /proc/self/fd/4 ] && [ -e /proc/self/fd/6 ]'
c "log fd 5 not passed"          '[ ! -e /proc/$$/fd/5 ]'
c "no capabilities"              'grep -q "^CapEff:[[:space:]]*0000000000000000" /proc/self/status'
c "no_new_privs"                 'grep -q "^NoNewPrivs:[[:space:]]*1" /proc/self/status'
c "passwd names uid 1000 agent"  'grep -q "^agent:x:1000:1000:.*:/home/agent:" /etc/passwd'
EOF

render "$tmp/check.cfg" 'exec_bin { path: "/bin/sh" arg: "/proc/self/fd/6/inside.sh" }'
if out=$("$nsjail" --config "$tmp/check.cfg" 3</etc/hostname 4</etc/hostname 5>"$tmp/nsjail.log" \
    6<"$tmp/turn" 2>&1); then
    printf '%s\n' "$out"
    fails=$((fails + $(grep -c '^FAIL' <<<"$out" || true)))
    if [[ $(stat -c %u:%g "$tmp/home/from-jail" "$tmp/work/from-jail" 2>/dev/null | sort -u) \
        == "$OUTSIDE_ID:$OUTSIDE_ID" ]]; then
        ok "files written in the jail are owned by $OUTSIDE_ID on the host"
    else
        fail "files written in the jail are owned by $OUTSIDE_ID on the host"
    fi
else
    printf '%s\n' "$out"
    cat "$tmp/nsjail.log" >&2
    fail "nsjail ran the profile"
fi

# 4. Raw spawn cost: nsjail start to /bin/true's exit, through every mount of the profile.
if ((bench > 0)); then
    render "$tmp/true.cfg" 'exec_bin { path: "/bin/true" }'
    for _ in $(seq $((bench + 3))); do
        s=$(date +%s%N)
        "$nsjail" --config "$tmp/true.cfg" 3</dev/null 4</dev/null 5>/dev/null 6<"$tmp/turn" ||
            die "spawn failed"
        echo $((($(date +%s%N) - s) / 1000))
    done | tail -n +4 | sort -n | awk '{ v[NR] = $1 } END {
        printf "bench: %d spawns of /bin/true: p50 %.1f ms, p90 %.1f ms, min %.1f ms, max %.1f ms\n",
            NR, v[int(NR * 0.5) + 1] / 1000, v[int(NR * 0.9) + 1] / 1000, v[1] / 1000, v[NR] / 1000 }'
fi

((fails == 0)) || die "$fails check(s) failed"
echo "all checks passed: $cfg"
