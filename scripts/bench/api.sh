#!/usr/bin/env bash
# API benchmark: latency of `GET /api/v1/apps` and of the dashboard's apps page (`GET /`,
# logged in) with 200 apps, and how much the server's memory grows under that load. Prints ONE
# table.
# Goals (issue 5): p99 ≤ 20 ms, RSS growth ≤ 10 MB. No peer is named for this goal; the
# ratio column is berth's number over the goal.
#
# A real `berth server` (release build, --ephemeral, its own data dir, bridge and subnet,
# loopback ports); 200 apps made through the CLI; an admin token; `wrk` with 4 keep-alive
# connections for ROUNDS rounds of SECONDS each; p50/p99 are the medians over the rounds. RSS is
# the server's VmRSS before the first round and after the last.
#
# Usage: scripts/bench/api.sh   (as root; env APPS=200 ROUNDS=5 SECONDS_PER_ROUND=5)
set -euo pipefail
cd "$(dirname "$0")/../.."

APPS=${APPS:-200}
ROUNDS=${ROUNDS:-5}
SECONDS_PER_ROUND=${SECONDS_PER_ROUND:-5}
if ! command -v wrk >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq wrk >/dev/null
fi
source scripts/deps
cargo build --release --locked >&2
berth_bin=$PWD/target/release/berth

dir=$(mktemp -d /tmp/berth-api-bench-XXXXXX)
data=$dir/data
source scripts/bench/server.sh
cleanup() {
    stop_server
    rm -rf "$dir"
}
trap cleanup EXIT
berth() { "$berth_bin" --data "$data" "$@"; }

start_server "$berth_bin" "$dir" "bapi$$" 10.197.0.0/16

for i in $(seq "$APPS"); do berth apps:create "app-$i" >/dev/null; done
token=$(berth tokens:create bench 2>/dev/null)
# A dashboard session: the login form's CSRF token, then the admin's new password.
password=$(berth users:passwd admin | awk '{print $NF}')
jar=$dir/cookies
csrf=$(curl -sf -c "$jar" "http://$api/login" | sed -n 's/.*name="csrf" value="\([^"]*\)".*/\1/p' | head -n 1)
curl -sf -b "$jar" -c "$jar" -o /dev/null --data-urlencode "csrf=$csrf" --data-urlencode "user=admin" \
    --data-urlencode "password=$password" "http://$api/login"
cookie=$(awk '{sub(/^#HttpOnly_/, "")} $0 !~ /^#/ && NF >= 7 {printf "%s=%s", $6, $7}' "$jar")
curl -sf -H "Cookie: $cookie" "http://$api/" | grep -q "app-$APPS" || {
    echo "error: could not log in to the dashboard — see $dir/server.log" >&2
    exit 1
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$server/status"; }

# wrk's latency percentile in ms from its --latency output.
percentile() {
    awk -v p="$1" '$1 == p {
        v = $2; unit = v; sub(/[0-9.]+/, "", unit); sub(/[a-z]+$/, "", v);
        if (unit == "us") v /= 1000; else if (unit == "s") v *= 1000;
        printf "%.2f", v }' "$2"
}
median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

# Measures GET $2 (with header $3) for ROUNDS rounds; prints "p50 p99 requests/s".
measure() {
    local path=$1 header=$2 p50s=() p99s=() rates=() out
    curl -sf -H "$header" "http://$api$path" >/dev/null || {
        echo "error: GET $path failed — see $dir/server.log" >&2
        exit 1
    }
    for _ in $(seq "$ROUNDS"); do
        out=$dir/wrk.txt
        wrk -t1 -c4 -d"${SECONDS_PER_ROUND}s" --latency -H "$header" "http://$api$path" >"$out"
        p50s+=("$(percentile 50% "$out")")
        p99s+=("$(percentile 99% "$out")")
        rates+=("$(awk '/^Requests\/sec:/ {print $2}' "$out")")
    done
    echo "$(printf '%s\n' "${p50s[@]}" | median) $(printf '%s\n' "${p99s[@]}" | median) $(printf '%s\n' "${rates[@]}" | median)"
}

before=$(rss_kib)
read -r api_p50 api_p99 api_rate < <(measure /api/v1/apps "Authorization: Bearer $token")
read -r page_p50 page_p99 page_rate < <(measure / "Cookie: $cookie")
after=$(rss_kib)
growth_mb=$(awk -v a="$after" -v b="$before" 'BEGIN {printf "%.1f", (a - b) / 1024}')

printf '%-32s %10s %10s %8s\n' "measure ($APPS apps, median of $ROUNDS)" "berth" "goal" "ratio"
row() { printf '%-32s %10s %10s %8s\n' "$1" "$2" "$3" "$(awk -v a="$2" -v b="$3" 'BEGIN {printf "%.2f", a / b}')"; }
row "GET /api/v1/apps p50 (ms)" "$api_p50" "20"
row "GET /api/v1/apps p99 (ms)" "$api_p99" "20"
printf '%-32s %10s %10s %8s\n' "GET /api/v1/apps requests/s" "$api_rate" "-" "-"
row "dashboard apps page p50 (ms)" "$page_p50" "20"
row "dashboard apps page p99 (ms)" "$page_p99" "20"
printf '%-32s %10s %10s %8s\n' "dashboard apps page requests/s" "$page_rate" "-" "-"
row "server RSS growth (MB)" "$growth_mb" "10"
printf '%-32s %10s %10s %8s\n' "server RSS after (MB)" "$(awk -v a="$after" 'BEGIN {printf "%.1f", a / 1024}')" "-" "-"
