#!/usr/bin/env bash
# Benchmarks berth's reverse proxy against Debian's nginx and haproxy, in front of one fast upstream,
# and prints ONE table: req/s, p50 and p99 with wrk at 50 and 200 connections, medians of ROUNDS runs
# (default 5) whose order of targets alternates, plus berth/nginx: the median of the rounds' ratios
# (berth and nginx run back to back in each round) and the lowest and highest round. It also gives
# the CPU time the serving process used per request, which other load disturbs less than req/s.
#
# The upstream, the same for every row, is Debian's nginx answering `200 ok` to every request inside a
# container that berth's embedded runtime runs in its own network namespace on a bridge of its own
# (examples/bench_upstream.rs), as `berth server` runs an app. wrk, nginx and haproxy reach it
# from the host, over the host's route and the container's veth (as Dokku's nginx reaches a
# container over Docker's bridge); berth, as `berth server` does, connects from inside the
# container's network namespace, where the connection to its address stays on that namespace's
# loopback. A second berth row, "berth over the veth", connects from the host like the others,
# to show what that path is worth. What each side gets: every proxy runs ONE worker thread — nginx
# `worker_processes 1`, haproxy `nbthread 1`, berth a current-thread tokio runtime
# (examples/proxy_bench.rs, `proxy::run` with berth's default settings; `berth server` itself
# runs one tokio worker per core) — keeps upstream connections alive and writes no access log
# (berth's `berth::access` lines go nowhere without a subscriber). wrk runs one thread.
# Every proxy does the per-request work berth does (the work a PaaS's nginx config does, as
# Dokku's): it sends the upstream Host, X-Forwarded-For (appended), X-Real-IP,
# X-Forwarded-Proto/-Host/-Port and an X-Request-Id (the client's, else a new random one; haproxy:
# always a new one), drops a client's `Forwarded`, and returns the X-Request-Id to the client.
# Everything runs on this machine, so wrk, the proxies and the upstream share its cores; the
# load average at the start and end is printed under the table. On exit, Ctrl-C included, the
# upstream removes its container, netns, bridge, nftables table and files.
#
# Usage: scripts/bench/proxy.sh   (as root; env ROUNDS=5 DURATION=5s)
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5s}
BERTH=18081 NGINX=18082 HAPROXY=18083 BERTH_VETH=18084

missing=()
for tool in nginx haproxy wrk; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
fi
source scripts/deps
cargo build --release --example proxy_bench --example bench_upstream >&2

dir=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf --one-file-system "$dir" # never into a mount the upstream may have left
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# The upstream container; it prints its address and its netns once nginx in it answers.
target/release/examples/bench_upstream "$dir/upstream" >"$dir/upstream.addr" 2>"$dir/upstream.err" &
pids+=($!)
for _ in $(seq 200); do
    [ -s "$dir/upstream.addr" ] || ! kill -0 "${pids[0]}" 2>/dev/null && break
    sleep 0.1
done
read -r UP NETNS <"$dir/upstream.addr" || true
[ -n "$UP" ] || { echo "error: the upstream container did not start: $(cat "$dir/upstream.err")" >&2; exit 1; }

nginx_conf() { # NAME PORT SERVER_BLOCK_BODY [HTTP_EXTRA]
    cat >"$dir/$1.conf" <<CONF
user root;
worker_processes 1;
daemon off;
pid $dir/$1.pid;
error_log $dir/$1.err;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path $dir/$1-body;
    proxy_temp_path $dir/$1-proxy;
    fastcgi_temp_path $dir/$1-fcgi;
    uwsgi_temp_path $dir/$1-uwsgi;
    scgi_temp_path $dir/$1-scgi;
    ${4:-}
    server { listen 127.0.0.1:$2; location / { $3 } }
}
CONF
}
nginx_conf nginx $NGINX "proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\";
    proxy_set_header Host \$http_host; proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    proxy_set_header X-Real-IP \$remote_addr; proxy_set_header X-Forwarded-Proto \$scheme;
    proxy_set_header X-Forwarded-Host \$http_host; proxy_set_header X-Forwarded-Port \$server_port;
    proxy_set_header X-Request-Id \$rid; proxy_set_header Forwarded \"\"; add_header X-Request-Id \$rid always;" \
    "upstream app { server $UP; keepalive 256; }
    map \$http_x_request_id \$rid { default \$http_x_request_id; \"\" \$request_id; }"
cat >"$dir/haproxy.cfg" <<CONF
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
    http-reuse always
frontend web
    bind 127.0.0.1:$HAPROXY
    option forwardfor
    unique-id-format %[uuid()]
    unique-id-header X-Request-Id
    http-request del-header Forwarded
    http-request set-header X-Real-IP %[src]
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request set-header X-Forwarded-Port %[dst_port]
    http-after-response set-header X-Request-Id %[unique-id]
    default_backend app
backend app
    server up $UP
CONF

declare -A worker # the process that serves each target, whose CPU time is measured
nginx -e "$dir/nginx.err" -c "$dir/nginx.conf" & pids+=($!)
haproxy -f "$dir/haproxy.cfg" 2>"$dir/haproxy.err" & pids+=($!)
worker[haproxy]=$!
target/release/examples/proxy_bench 127.0.0.1:$BERTH "$UP" "$NETNS" & pids+=($!)
worker[berth]=$!
target/release/examples/proxy_bench 127.0.0.1:$BERTH_VETH "$UP" & pids+=($!)
worker[berth-veth]=$!
declare -A url=([direct]="http://$UP/" [berth]="http://127.0.0.1:$BERTH/"
    [nginx]="http://127.0.0.1:$NGINX/" [haproxy]="http://127.0.0.1:$HAPROXY/"
    [berth-veth]="http://127.0.0.1:$BERTH_VETH/")
names=(direct berth nginx haproxy berth-veth)
for name in "${names[@]}"; do
    for _ in $(seq 100); do
        curl -fs -H 'Host: bench.localhost' "${url[$name]}" >/dev/null && break
        sleep 0.1
    done
    curl -fs -H 'Host: bench.localhost' "${url[$name]}" >/dev/null ||
        { echo "error: nothing answers at ${url[$name]} — see $dir/*.err" >&2; exit 1; }
done
# The container's nginx worker: the child of its master, the container's first process.
worker[direct]=$(pgrep -P "$(cat "$dir"/upstream/containers/*/pid)")
worker[nginx]=$(pgrep -P "${pids[1]}")

# CPU time (user + system, in clock ticks) a process has used so far.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))

# One wrk run: prints "REQ_PER_S P50_MS P99_MS CPU_US_PER_REQUEST" (CPU of the target's process).
measure() { # NAME CONNECTIONS
    local before wrk_out
    before=$(cpu_ticks "${worker[$1]}")
    wrk_out=$(wrk -t1 -c"$2" -d"$DURATION" --latency -H 'Host: bench.localhost' "${url[$1]}")
    awk -v ticks=$(($(cpu_ticks "${worker[$1]}") - before)) -v tick_us="$TICK_US" '
        function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
        /requests in/ { n = $1 } /Requests\/sec/ { rps = $2 } $1 == "50%" { p50 = ms($2) } $1 == "99%" { p99 = ms($2) }
        END { printf "%s %.3f %.3f %.2f\n", rps, p50, p99, ticks * tick_us / n }' <<<"$wrk_out"
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for round in $(seq "$ROUNDS"); do
    order=("${names[@]}")
    ((round % 2 == 0)) && order=(berth-veth haproxy nginx berth direct)
    for c in 50 200; do
        for name in "${order[@]}"; do
            echo "round $round: $name c=$c" >&2
            measure "$name" "$c" >>"$dir/$name-$c"
        done
    done
done

column() { # FILE COLUMN: that column's values, ascending
    sort -n -k"$2" "$1" | awk -v col="$2" '{ print $col }'
}
median() { # FILE COLUMN
    column "$1" "$2" | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}
range() { # FILE COLUMN: lowest-highest
    column "$1" "$2" | awk '{ v[NR] = $1 } END { printf "%.2f-%.2f", v[1], v[NR] }'
}
printf '%-22s %6s %12s %10s %10s %12s\n' target conns 'req/s' 'p50 ms' 'p99 ms' 'CPU us/req'
for c in 50 200; do
    for name in "${names[@]}"; do
        case $name in
        direct) label='upstream direct' ;;
        berth) label='berth (1 thread)' ;;
        berth-veth) label='berth over the veth' ;;
        *) label="$name (1 worker)" ;;
        esac
        printf '%-22s %6s %12s %10s %10s %12s\n' "$label" "$c" "$(median "$dir/$name-$c" 1)" \
            "$(median "$dir/$name-$c" 2)" "$(median "$dir/$name-$c" 3)" "$(median "$dir/$name-$c" 4)"
    done
    # berth and nginx run back to back in each round, so a round's ratio leaves out the slow
    # drift of a shared machine; the median round and the lowest and highest are printed.
    ratios=$dir/berth-nginx-$c
    paste -d' ' "$dir/berth-$c" "$dir/nginx-$c" |
        awk '{ printf "%.4f %.4f %.4f\n", $1 / $5, $3 / $7, $4 / $8 }' >"$ratios"
    printf '%-22s %6s %12.2f %10s %10.2f %12.2f\n' berth/nginx "$c" "$(median "$ratios" 1)" '' \
        "$(median "$ratios" 2)" "$(median "$ratios" 3)"
    printf '%-22s %6s %12s %10s %10s %12s\n' '  lowest-highest round' "$c" "$(range "$ratios" 1)" '' \
        "$(range "$ratios" 2)" "$(range "$ratios" 3)"
done
echo "(medians of $ROUNDS runs of $DURATION each, berth/nginx the median of the rounds' ratios; upstream: nginx returning 200 ok in a berth container at $UP)"
echo "(load average before: $load_before, after: $(cut -d' ' -f1-3 /proc/loadavg), on $(nproc) cores)"
