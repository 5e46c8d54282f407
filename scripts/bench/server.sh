# Sourced by the bench scripts: a throwaway `berth server` on loopback ports.
#
# start_server BIN DIR BRIDGE SUBNET [ARGS…]: starts `BIN --data DIR/data server` (--ephemeral,
#   loopback ports, domain localhost, its own bridge and subnet, ARGS after), its ready line in
#   DIR/ready and log in DIR/server.log; waits until it is ready and sets `server` (its pid),
#   `http`, `api` (addresses) and `ssh_port`; exits with an error when it does not start.
# stop_server: SIGTERM, then waits (an --ephemeral server stops its containers and removes its
#   bridge and table first).
# link_shared_stacks DATA: hard-links the stack images of the slow tests' shared store (when it
#   exists) into DATA/images, so the first push does not build them (minutes of apt).

start_server() {
    local bin=$1 dir=$2 bridge=$3 subnet=$4
    shift 4
    "$bin" --data "$dir/data" server --http 127.0.0.1:0 --ssh 127.0.0.1:0 --api 127.0.0.1:0 \
        --domain localhost --ephemeral --bridge "$bridge" --subnet "$subnet" "$@" \
        >"$dir/ready" 2>"$dir/server.log" &
    server=$!
    for _ in $(seq 600); do grep -q ready "$dir/ready" && break; sleep 0.1; done
    http=$(grep -o 'http=[^ ]*' "$dir/ready" | cut -d= -f2)
    api=$(grep -o 'api=[^ ]*' "$dir/ready" | cut -d= -f2)
    ssh_port=$(grep -o 'ssh=[^ ]*' "$dir/ready" | cut -d= -f2 | cut -d: -f2)
    if [ -z "$http" ]; then
        echo "error: berth server did not start:" >&2
        tail -n 20 "$dir/server.log" >&2
        exit 1
    fi
}

stop_server() {
    if [ -n "${server:-}" ]; then
        kill -TERM "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
}

link_shared_stacks() {
    local shared
    shared=$(ls -td /var/tmp/berth-test-stacks-2/trixie-*/images 2>/dev/null | head -n 1 || true)
    if [ -n "$shared" ]; then
        mkdir -p "$1/images"
        cp -al "$shared/." "$1/images/"
    fi
}
