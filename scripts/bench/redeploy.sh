#!/usr/bin/env bash
# Warm-redeploy benchmark: how long a push of a one-line change to a Python buildpack app with
# cached dependencies takes until the new code answers through the proxy (the issue's goal:
# ≤ 2 s), median of 5 alternating with a cold push for reference, and prints ONE table.
#
# A real `berth server` (release build, --ephemeral, its own data dir, bridge and subnet, loopback
# ports) runs tests/apps/flask-hello (Flask and gunicorn from PyPI), pushed with the real git
# over ssh. Each round times `git push` → `curl` through the proxy answering with the new
# version. The stack images are linked from the slow tests' shared store when it exists
# (/var/tmp/berth-test-stacks-2), else the first push builds them (minutes, not measured).
# The server's build timings (tracing, `berth::build`) are in the log it prints the path of.
#
# Usage: scripts/bench/redeploy.sh   (as root; env ROUNDS=5, BERTH_BIN to use another binary)
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS=${ROUNDS:-5}
GOAL_MS=2000
if [ -z "${BERTH_BIN:-}" ]; then
    source scripts/deps
    cargo build --release --locked >&2
    BERTH_BIN=$PWD/target/release/berth
fi

dir=$(mktemp -d /tmp/berth-redeploy-bench-XXXXXX)
data=$dir/data
source scripts/bench/server.sh
cleanup() {
    stop_server
    cp "$dir/server.log" /tmp/berth-redeploy-bench.log 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
berth() { "$BERTH_BIN" --data "$data" "$@"; }

link_shared_stacks "$data"

start_server "$BERTH_BIN" "$dir" "brd$$" 10.196.0.0/16

ssh-keygen -q -t ed25519 -N '' -f "$dir/key"
berth keys:add bench "$dir/key.pub" >/dev/null
app=$dir/app
cp -r tests/apps/flask-hello "$app"
export GIT_SSH_COMMAND="ssh -i $dir/key -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
git -C "$app" init -q -b main

now_ms() { echo $(($(date +%s%N) / 1000000)); }
# Pushes version $2 of the app to app $1 and prints the milliseconds until it answers.
push() {
    local name=$1 version=$2 start answer
    sed -i "s/^VERSION = .*/VERSION = \"$version\"/" "$app/app.py"
    git -C "$app" add -A
    git -C "$app" -c user.name=bench -c user.email=bench@localhost commit -qm "$version"
    start=$(now_ms)
    if ! git -C "$app" push -q "ssh://git@127.0.0.1:$ssh_port/$name" HEAD:main >"$dir/push.txt" 2>&1; then
        echo "error: the push of $version failed:" >&2
        cat "$dir/push.txt" >&2
        exit 1
    fi
    for _ in $(seq 200); do
        answer=$(curl -s -H "Host: $name.localhost" "http://$http/" || true)
        [ "$answer" = "hello $version" ] && break
        sleep 0.05
    done
    [ "$answer" = "hello $version" ] || { echo "error: $name never answered with $version (got: $answer)" >&2; exit 1; }
    echo $(($(now_ms) - start))
}
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# One app for warm pushes; cold pushes go to a new app each round (empty cache), alternating.
berth apps:create warm >/dev/null
push warm w0 >/dev/null
warm=() cold=()
for round in $(seq "$ROUNDS"); do
    warm+=("$(push warm "w$round")")
    berth apps:create "cold$round" >/dev/null
    cold+=("$(push "cold$round" "c$round")")
    berth apps:destroy "cold$round" --force >/dev/null
done
warm_ms=$(printf '%s\n' "${warm[@]}" | median)
cold_ms=$(printf '%s\n' "${cold[@]}" | median)

printf '%-46s %10s %10s %14s\n' "push → new code answering (median of $ROUNDS)" "berth s" "goal s" "berth / goal"
printf '%-46s %10s %10s %14s\n' "warm: one-line change, dependencies cached" \
    "$(awk -v m="$warm_ms" 'BEGIN { printf "%.2f", m / 1000 }')" "2.00" \
    "$(awk -v m="$warm_ms" -v g="$GOAL_MS" 'BEGIN { printf "%.2f", m / g }')"
printf '%-46s %10s %10s %14s\n' "cold: new app, empty cache (reference)" \
    "$(awk -v m="$cold_ms" 'BEGIN { printf "%.2f", m / 1000 }')" "-" "-"
echo "warm rounds (ms): ${warm[*]}; cold rounds (ms): ${cold[*]}; server log: /tmp/berth-redeploy-bench.log" >&2
