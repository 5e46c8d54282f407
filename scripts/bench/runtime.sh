#!/usr/bin/env bash
# Runtime benchmark, ONE table from one run:
#  1. start-to-exit latency of `true` (median of ROUNDS=50, rotating which runtime goes first)
#     in one OCI bundle (static busybox rootfs, no network namespace) under berth's embedded
#     runtime (examples/bench_start.rs: a shim per container, forked by the shim launcher as
#     the server starts app containers, and executed as it runs builds and one-off commands),
#     crun and runc. This host is a cgroup v1/v2 hybrid with the hugetlb controller on v2, which
#     crun 1.8 refuses ("cgroups in hybrid mode not supported"): all three run in a private
#     mount namespace with /sys/fs/cgroup/unified unmounted, so each sees a plain cgroup v1
#     host (nothing outside that namespace changes);
#  2. density: N=1000 idle web containers (busybox httpd, a Dockerfile `FROM scratch` app) started
#     through a real `berth server` (release build, --ephemeral, its own data dir, bridge, subnet
#     and loopback ports), pushed with git over ssh; berth's `ps:scale` takes at most 50
#     containers per process type, so the one app is pushed to N/50 app names, 50 each. Measured
#     once all run: the server's RSS and threads (and both at the first 50, to show they do not
#     grow per container), each container's overhead (PSS of its shim and init; the app's own
#     httpd is not counted) and host memory per container (MemAvailable before − after, / N;
#     noisy on a shared machine), beside conmon's PSS per container (Debian's conmon + crun
#     running `sleep` in the same bundle, 10 containers) as the peer.
#
# Cleanup (also on failure or ^C): the server is stopped (an --ephemeral server stops every
# container and removes its cgroups, bridge and nftables table), then anything left is removed:
# shims and conmon/crun containers, mounts under the work dir, the bridge and table, the dir.
#
# Usage: scripts/bench/runtime.sh   (as root; env N=1000 (a multiple of 50), ROUNDS=50,
#        BERTH_BIN and BENCH_START to use prebuilt binaries)
set -euo pipefail
cd "$(dirname "$0")/../.."

N=${N:-1000}
ROUNDS=${ROUNDS:-50}
PER_APP=50
CONMONS=10
[ $((N % PER_APP)) -eq 0 ] || { echo "error: N must be a multiple of $PER_APP" >&2; exit 2; }
# The peers and tools, from Debian's apt when missing (command:package).
missing=()
for pair in crun:crun runc:runc conmon:conmon busybox:busybox jq:jq git:git \
    ssh-keygen:openssh-client unshare:util-linux; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
fi
if [ -z "${BERTH_BIN:-}" ] || [ -z "${BENCH_START:-}" ]; then
    source scripts/deps
    cargo build --release --locked --bin berth --example bench_start >&2
    BERTH_BIN=$PWD/target/release/berth
    BENCH_START=$PWD/target/release/examples/bench_start
fi

dir=$(mktemp -d /tmp/berth-runtime-bench-XXXXXX)
data=$dir/data
bridge="brt$$"
source scripts/bench/server.sh
server=""
# crun sees a plain cgroup v1 host in here (see above).
v1() { unshare -m --propagation private sh -c 'umount /sys/fs/cgroup/unified 2>/dev/null; exec "$@"' sh "$@"; }
cleanup() {
    set +e
    if [ -n "$server" ]; then
        kill -TERM "$server" 2>/dev/null
        # It stops every container first; past 5 minutes it is killed and the rest cleaned here.
        for _ in $(seq 3000); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$server" 2>/dev/null
        wait "$server" 2>/dev/null
    fi
    for id in $(crun list 2>/dev/null | awk -v p="bench-conmon-$$-" 'index($1, p) == 1 { print $1 }'); do
        v1 crun delete -f "$id" >/dev/null 2>&1
    done
    for pid in $(pgrep -f "$dir"); do kill -KILL "$pid" 2>/dev/null; done
    # Cgroups of containers whose shim was killed (v1: one per controller; v2: one).
    for id in $(ls "$data/containers" 2>/dev/null); do
        rmdir /sys/fs/cgroup/*/berth/"$id" /sys/fs/cgroup/berth/"$id" 2>/dev/null
    done
    awk -v d="$dir" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
        while read -r mnt; do umount -l "$mnt"; done
    ip link del "$bridge" 2>/dev/null
    nft delete table inet "berth-$bridge" 2>/dev/null
    cp "$dir/server.log" /tmp/berth-runtime-bench.log 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
berth() { "$BERTH_BIN" --data "$data" "$@"; }
kib() { awk '/^MemAvailable:/ { print $2 }' /proc/meminfo; }
# Summed PSS (KiB) of the given pids.
pss() { for p in "$@"; do awk '/^Pss:/ { print $2 }' "/proc/$p/smaps_rollup" 2>/dev/null; done | awk '{ s += $1 } END { print s + 0 }'; }
status_of() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

# --- the bundle ---------------------------------------------------------------------------
bundle=$dir/bundle
mkdir -p "$bundle/rootfs"/{bin,proc,dev,sys,tmp,www}
cp "$(command -v busybox)" "$bundle/rootfs/bin/busybox"
for tool in sh true sleep httpd; do ln -s busybox "$bundle/rootfs/bin/$tool"; done
(cd "$bundle" && runc spec)
jq '.process.args = ["true"] | .process.terminal = false
    | .linux.namespaces |= map(select(.type != "network"))' "$bundle/config.json" >"$bundle/c.json"
mv "$bundle/c.json" "$bundle/config.json"

# --- 1. start-to-exit ---------------------------------------------------------------------
echo "start-to-exit: $ROUNDS rounds of berth, crun, runc …" >&2
v1 "$BENCH_START" "$bundle" "$ROUNDS" "$dir/start" >"$dir/start.txt"
latency() { awk -v r="$1" '$1 == r { print $2 }' "$dir/start.txt"; }

# --- conmon's overhead per container --------------------------------------------------------
echo "conmon: $CONMONS idle containers …" >&2
cbundle=$dir/cbundle
mkdir -p "$cbundle" "$dir/conmon"/{exits,sock,persist}
cp -a "$bundle/rootfs" "$cbundle/rootfs"
jq '.process.args = ["sleep", "100000"]' "$bundle/config.json" >"$cbundle/config.json"
conmons=()
for i in $(seq "$CONMONS"); do
    id="bench-conmon-$$-$i"
    mkdir -p "$dir/conmon/persist/$i"
    v1 conmon --api-version 1 -c "$id" -u "$id" -n "$id" -r "$(command -v crun)" -b "$cbundle" \
        -p "$dir/conmon/$i.pid" -P "$dir/conmon/conmon-$i.pid" -l "k8s-file:$dir/conmon/$i.log" \
        --exit-dir "$dir/conmon/exits" --socket-dir-path "$dir/conmon/sock" \
        --persist-dir "$dir/conmon/persist/$i" --container-pidfile "$dir/conmon/$i.pid" >/dev/null
    # conmon returns before crun's create is done: wait for the container's pid file.
    for _ in $(seq 200); do [ -s "$dir/conmon/$i.pid" ] && break; sleep 0.05; done
    v1 crun start "$id"
    conmons+=("$(cat "$dir/conmon/conmon-$i.pid")")
done
conmon_kib=$(($(pss "${conmons[@]}") / CONMONS))
for i in $(seq "$CONMONS"); do v1 crun delete -f "bench-conmon-$$-$i" >/dev/null; done

# --- 2. density -----------------------------------------------------------------------------
# The stack images (which the server would otherwise build on the first push, minutes of apt)
# come from the slow tests' shared store when it exists.
link_shared_stacks "$data"
avail_before=$(kib)
start_server "$BERTH_BIN" "$dir" "$bridge" 10.197.0.0/16

ssh-keygen -q -t ed25519 -N '' -f "$dir/key"
berth keys:add bench "$dir/key.pub" >/dev/null
app=$dir/app
mkdir -p "$app/www"
cp -a "$bundle/rootfs/bin" "$app/bin"
echo "idle" >"$app/www/index.html"
cat >"$app/Dockerfile" <<'EOF'
FROM scratch
COPY bin /bin
COPY www /www
ENV PATH=/bin
EXPOSE 8080
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
EOF
export GIT_SSH_COMMAND="ssh -i $dir/key -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
git -C "$app" init -q -b main
git -C "$app" add -A
git -C "$app" -c user.name=bench -c user.email=bench@localhost commit -qm idle

apps=$((N / PER_APP))
started=$(date +%s)
for a in $(seq "$apps"); do
    name="idle$a"
    berth apps:create "$name" >/dev/null
    git -C "$app" push -q "ssh://git@127.0.0.1:$ssh_port/$name" HEAD:main >"$dir/push.txt" 2>&1 ||
        { echo "error: the push to $name failed:" >&2; cat "$dir/push.txt" >&2; exit 1; }
    berth ps:scale "$name" "web=$PER_APP" >/dev/null
    if [ "$a" -eq 1 ]; then
        first_rss=$(status_of "$server" VmRSS) first_threads=$(status_of "$server" Threads)
    fi
    echo "  $((a * PER_APP)) containers after $(($(date +%s) - started)) s" >&2
done
up=0
for a in $(seq "$apps"); do
    up=$((up + $(berth ps "idle$a" --json | jq '[.[] | select(.state == "up")] | length')))
done
answer=$(curl -s -H "Host: idle$apps.localhost" "http://$http/")
avail_after=$(kib)
rss=$(status_of "$server" VmRSS) threads=$(status_of "$server" Threads)
shims=$(pgrep -f "shim $data/containers/" || true)
children() { for p in "$@"; do cat "/proc/$p/task/$p/children" 2>/dev/null; done; }
inits=$(children $shims)
init_names=$(for p in $inits; do cat "/proc/$p/comm"; done | sort -u | tr '\n' ' ')
shim_count=$(echo "$shims" | grep -c . || true)
shim_kib=$(($(pss $shims) / shim_count))
init_kib=$(($(pss $inits) / shim_count))
host_kib=$(((avail_before - avail_after) / N))

# --- the table ------------------------------------------------------------------------------
crun_ms=$(latency crun) runc_ms=$(latency runc) berth_ms=$(latency berth)
attached_ms=$(latency berth-attached)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }
row() { printf '| %-58s | %-16s | %-22s | %-10s |\n' "$@"; }
row "measure" "berth" "peer" "berth/peer"
row "---" "---" "---" "---"
row "start-to-exit of \`true\`, median of $ROUNDS (ms)" "$berth_ms" "crun $crun_ms" "$(ratio "$berth_ms" "$crun_ms")"
row "" "" "runc $runc_ms" "$(ratio "$berth_ms" "$runc_ms")"
row "  the same as an attached run (builds, \`run\`: shim executed)" "$attached_ms" "crun $crun_ms" "$(ratio "$attached_ms" "$crun_ms")"
row "containers up (of $N, $apps apps × $PER_APP)" "$up" "-" "-"
row "daemon RSS with $N containers (goal ≤ 50 MiB)" "$(mib "$rss")" "-" "-"
row "daemon RSS with $PER_APP containers" "$(mib "$first_rss")" "-" "-"
row "daemon threads with $N / with $PER_APP containers" "$threads / $first_threads" "-" "-"
row "overhead per container: shim PSS (berth) vs conmon PSS" "$(mib "$shim_kib")" "conmon $(mib "$conmon_kib")" "$(ratio "$shim_kib" "$conmon_kib")"
row "  + the container's init ($init_names) PSS" "$(mib "$init_kib")" "-" "-"
row "host memory per container (MemAvailable delta / N)" "$(mib "$host_kib")" "-" "-"
echo "load: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores; start-to-exit min/max (ms): $(awk '{ printf "%s %s/%s  ", $1, $3, $4 }' "$dir/start.txt"); answer of idle$apps: $answer; server log: /tmp/berth-runtime-bench.log" >&2
