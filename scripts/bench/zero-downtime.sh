#!/usr/bin/env bash
# Zero-downtime benchmark: requests served, failed requests and p99 latency while 20 changes run
# in a row against one app under steady load, and prints ONE table. Goal: 0 failed.
#
# A real `berth server` (release build, --ephemeral, its own data dir, bridge and subnet, loopback
# ports) runs the stdlib Python app of tests/apps/stdlib-web, pushed with the real git over ssh.
# `wrk` keeps 20 keep-alive connections busy through berth's proxy while the changes run: 4 pushes,
# 4 config:set, 2× ps:scale web=3 then web=1, 4 ps:restart, 4 releases:rollback. "failed" counts
# non-2xx answers and socket errors (connect, read, write, timeout). The first push builds the
# stack images (about a minute, once per run); only the changes are measured.
#
# Usage: scripts/bench/zero-downtime.sh   (as root; env CONNECTIONS=20)
set -euo pipefail
cd "$(dirname "$0")/../.."

CONNECTIONS=${CONNECTIONS:-20}
if ! command -v wrk >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq wrk >/dev/null
fi
source scripts/deps
cargo build --release --locked >&2
berth_bin=$PWD/target/release/berth

dir=$(mktemp -d /tmp/berth-zd-bench-XXXXXX)
data=$dir/data
source scripts/bench/server.sh
cleanup() {
    stop_server
    rm -rf "$dir"
}
trap cleanup EXIT
berth() { "$berth_bin" --data "$data" "$@"; }

start_server "$berth_bin" "$dir" "bzd$$" 10.198.0.0/16

ssh-keygen -q -t ed25519 -N '' -f "$dir/key"
berth keys:add bench "$dir/key.pub" >/dev/null
berth apps:create bench >/dev/null
app=$dir/app
mkdir "$app"
cp tests/apps/stdlib-web/app.py "$app/"
printf 'web: python3 app.py\n' >"$app/Procfile"
export GIT_SSH_COMMAND="ssh -i $dir/key -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
git -C "$app" init -q -b main
git -C "$app" -c user.name=bench -c user.email=bench@localhost remote add deploy "ssh://git@127.0.0.1:$ssh_port/bench"
push() {
    echo "$1" >"$app/version.txt"
    git -C "$app" add -A
    git -C "$app" -c user.name=bench -c user.email=bench@localhost commit -qm "$1"
    git -C "$app" push -q deploy main >/dev/null 2>&1
}
push c0

# Load for as long as the changes take: wrk runs until it is stopped.
wrk -t2 -c"$CONNECTIONS" -d1h --latency -H 'Host: bench.localhost' "http://$http/" >"$dir/wrk.txt" 2>&1 &
wrk=$!
start=$(date +%s%N)
for step in $(seq 20); do
    case $((step % 10)) in
        1 | 6) push "c$step" ;;
        2 | 7) berth config:set bench "GREETING=g$step" >/dev/null ;;
        3) berth ps:scale bench web=3 >/dev/null ;;
        4) berth ps:scale bench web=1 >/dev/null ;;
        5 | 8) berth ps:restart bench >/dev/null ;;
        *) berth releases:rollback bench >/dev/null ;;
    esac
done
elapsed_ms=$((($(date +%s%N) - start) / 1000000))
kill -INT "$wrk"
wait "$wrk" || true

requests=$(awk '/requests in/ {print $1}' "$dir/wrk.txt")
non2xx=$(awk '/Non-2xx/ {print $NF}' "$dir/wrk.txt")
sockets=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$dir/wrk.txt")
p99=$(awk '$1 == "99%" {print $2}' "$dir/wrk.txt")
failed=$((${non2xx:-0} + ${sockets:-0}))

printf '%-34s %12s %10s %8s %10s\n' "run" "requests" "failed" "p99" "seconds"
printf '%-34s %12s %10s %8s %7d.%01d\n' "berth, 20 changes, $CONNECTIONS conns" "${requests:-0}" "$failed" "${p99:-?}" $((elapsed_ms / 1000)) $((elapsed_ms % 1000 / 100))
if [ "$failed" -ne 0 ]; then
    echo "goal missed: $failed failed requests (wrk's summary: $dir/wrk.txt is removed on exit):" >&2
    cat "$dir/wrk.txt" >&2
fi
