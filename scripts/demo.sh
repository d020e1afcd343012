#!/usr/bin/env bash
# A demo turn end to end under nsjail, from a fresh Debian machine: installs nsjail,
# builds the broker and the static shim, starts `turnstile serve` on a temp state dir,
# runs two turns of one session through `turnstile run` (the second finds what the
# first left in its home and work dir), then a third whose agent asks a model through
# the LLM relay (a local stand-in endpoint; the key is added outside the jail), then
# stops the broker with SIGTERM.
# Needs root (the jail runs as an unprivileged uid mapped from the broker's).
set -euo pipefail
repo=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

nsjail=$(bash scripts/setup-nsjail.sh)
shim=$(bash scripts/build-shim.sh --locked -q)
cargo build --locked --release -q -p turnstile-cli
turnstile="$repo/target/release/turnstile"

work=$(mktemp -d /tmp/turnstile-demo.XXXXXX)
chmod 711 "$work"
socket="$work/broker.sock"
cleanup() {
    [[ -n "${model_pid:-}" ]] && kill "$model_pid" 2>/dev/null || true
    [[ -n "${broker_pid:-}" ]] && kill -TERM "$broker_pid" 2>/dev/null && wait "$broker_pid" || true
    rm -rf "$work"
}
trap cleanup EXIT

"$turnstile" serve --mode nsjail --state-dir "$work/state" --socket "$socket" \
    --nsjail "$nsjail" --shim "$shim" --jail-config "$repo/jail-configs/agent.cfg" \
    2> >(sed 's/^/[broker] /' >&2) &
broker_pid=$!
# Wait for the socket (the broker binds it before it serves).
for _ in $(seq 200); do [[ -S "$socket" ]] && break; sleep 0.05; done
[[ -S "$socket" ]] || { echo "demo: the broker did not start" >&2; exit 1; }

echo "--- turn 1: the agent writes its history into its home and work dir"
echo "approve the deploy?" | "$turnstile" run --socket "$socket" --session demo --env GREETING=hello -- \
    /bin/sh -c 'echo "$GREETING from uid $(id -u) (pid $$) in $PWD, HOME=$HOME";
                echo "interfaces: $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d " " | tr "\n" " ")";
                read question; echo "turn 1 asked: $question" >> $HOME/history; echo draft > plan.txt;
                echo "saved history"'
echo "--- turn 2: same session, same paths, the history is there"
"$turnstile" run --socket "$socket" --session demo -- \
    /bin/sh -c 'cat $HOME/history plan.txt; echo "exit code next: 3"; exit 3' || echo "turn 2 exited $?"
echo "--- a refused turn: invalid session id"
"$turnstile" run --socket "$socket" --session ../escape -- /bin/true || echo "refused with exit $?"
echo "--- turn 3: the agent asks its model through the LLM relay (the jail has no network)"
export DEMO_MODEL_KEY="sk-demo-$RANDOM$RANDOM"
exec {model_out}< <(python3 scripts/demo/stand-in-model.py)
model_pid=$!
read -r -u "$model_out" model_port
"$turnstile" run --socket "$socket" --session demo \
    --llm-upstream "http://127.0.0.1:$model_port" --llm-key-env DEMO_MODEL_KEY -- \
    python3 -c "$(cat scripts/demo/agent.py)" "is the deploy approved?"
