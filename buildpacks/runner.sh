#!/bin/sh
# berth's buildpack runner (Heroku buildpack API v2), run inside the build container:
#   sh /buildpacks/runner.sh BUILD_DIR CACHE_DIR ENV_DIR OUT_DIR
# Picks buildpacks (BUILD_DIR/.buildpacks, $BUILDPACK_URL, else detection), runs each compile in
# order (a buildpack's `export` file is sourced before the next one runs), writes
# OUT_DIR/release.yml and OUT_DIR/buildpacks. Output is not buffered: every step writes
# straight to our stdout/stderr.
#
# A buildpack is named by a built-in name, a path inside the app (`./tools/my-buildpack`), or a
# git URL (`https://…/x.git#ref`, `file:///…`), cloned here, inside the build container.
set -u

if [ $# -ne 4 ]; then
    echo "usage: sh runner.sh BUILD_DIR CACHE_DIR ENV_DIR OUT_DIR" >&2
    exit 2
fi
BUILD_DIR=$1
CACHE_DIR=$2
ENV_DIR=$3
OUT_DIR=$4
BUILDPACKS_DIR=$(cd "$(dirname "$0")" && pwd)
# Detection order: the first that applies is used.
BUILTINS="python node go static procfile"
FETCHED=$(mktemp -d) || exit 1
. "$BUILDPACKS_DIR/lib.sh"

# Prints the directory of the buildpack the user named, fetching it if needed; fails saying why.
resolve() {
    name=$1
    case "$name" in
        *://* | git@*)
            url=${name%%#*}
            ref=""
            [ "$url" != "$name" ] && ref=${name#*#}
            dir="$FETCHED/$(printf '%s' "$name" | sha256sum | cut -c1-12)"
            command -v git > /dev/null || fail "buildpack '$name': git is not in the build stack; rebuild it with 'berth stack:build --force'"
            echo "-----> Fetching buildpack $url${ref:+ ($ref)}" >&2
            if [ -n "$ref" ]; then
                git clone --quiet --depth 1 --branch "$ref" "$url" "$dir" >&2 \
                    || git clone --quiet "$url" "$dir" >&2 && git -C "$dir" checkout --quiet "$ref" >&2 \
                    || fail "buildpack '$name': could not clone it (see git's error above)"
            else
                git clone --quiet --depth 1 "$url" "$dir" >&2 \
                    || fail "buildpack '$name': could not clone it (see git's error above)"
            fi
            ;;
        */*)
            case "$name" in
                /* | *..*) fail "buildpack '$name': a path must be relative and inside the app, like ./tools/my-buildpack" ;;
            esac
            dir="$BUILD_DIR/${name#./}"
            [ -d "$dir" ] || fail "buildpack '$name': no such directory in the app"
            ;;
        *)
            for b in $BUILTINS; do
                if [ "$b" = "$name" ]; then
                    echo "$BUILDPACKS_DIR/$b"
                    return 0
                fi
            done
            fail "unknown buildpack '$name'; use a built-in ($BUILTINS), a path inside the app, or a git URL"
            ;;
    esac
    [ -f "$dir/bin/compile" ] || fail "buildpack '$name' has no bin/compile"
    echo "$dir"
}

chosen=""
if [ -f "$BUILD_DIR/.buildpacks" ]; then
    # One buildpack per line; blank lines and # comments ignored.
    n=0
    while IFS= read -r line || [ -n "$line" ]; do
        n=$((n + 1))
        name=$(printf '%s' "$line" | sed 's/[[:space:]]#.*//; s/^#.*//; s/^[[:space:]]*//; s/[[:space:]]*$//')
        [ -n "$name" ] || continue
        dir=$(resolve "$name") || fail ".buildpacks line $n: see above"
        chosen="$chosen $dir"
    done < "$BUILD_DIR/.buildpacks"
    [ -n "$chosen" ] || fail ".buildpacks lists no buildpack; add one per line, e.g. python"
else
    url=${BUILDPACK_URL:-}
    if [ -z "$url" ] && [ -f "$ENV_DIR/BUILDPACK_URL" ]; then
        url=$(cat "$ENV_DIR/BUILDPACK_URL")
    fi
    if [ -n "$url" ]; then
        chosen=$(resolve "$url") || exit 1
    else
        for b in $BUILTINS; do
            if sh "$BUILDPACKS_DIR/$b/bin/detect" "$BUILD_DIR" > /dev/null 2>&1; then
                chosen=$BUILDPACKS_DIR/$b
                break
            fi
        done
        [ -n "$chosen" ] || fail "no buildpack detected: add requirements.txt (Python), package.json (Node), go.mod (Go), index.html or public/ (static site), or a Procfile; or name buildpacks in .buildpacks"
    fi
fi

mkdir -p "$OUT_DIR" "$CACHE_DIR" || exit 1
: > "$OUT_DIR/buildpacks"
: > "$OUT_DIR/release.yml"
# Built-ins declare dependency folders (`FOLDER KEY` lines) that berth packs as layers of their
# own and reuses while the key is unchanged.
export BERTH_LAYERS="$OUT_DIR/layers"
: > "$BERTH_LAYERS"
for dir in $chosen; do
    name=${dir##*/}
    case "$dir" in
        "$FETCHED"/*) name=$(git -C "$dir" config --get remote.origin.url 2>/dev/null || echo "$name") ;;
    esac
    echo "-----> Using buildpack: $name"
    echo "$name" >> "$OUT_DIR/buildpacks"
    cache="$CACHE_DIR/$(printf '%s' "$name" | tr -c 'A-Za-z0-9_.-' '_')"
    mkdir -p "$cache"
    chmod +x "$dir"/bin/* 2> /dev/null
    "$dir/bin/compile" "$BUILD_DIR" "$cache" "$ENV_DIR"
    status=$?
    [ $status -eq 0 ] || fail "buildpack $name failed to compile (exit $status)"
    # API v2: what a buildpack exports is seen by the ones after it.
    if [ -f "$dir/export" ]; then
        . "$dir/export"
    fi
    # The release output of each buildpack, later ones winning per process type (the last
    # buildpack's defaults decide, as on Heroku).
    if [ -f "$dir/bin/release" ]; then
        "$dir/bin/release" "$BUILD_DIR" >> "$OUT_DIR/release.yml.$$" \
            || fail "buildpack $name: bin/release failed"
        mv "$OUT_DIR/release.yml.$$" "$OUT_DIR/release.yml"
    fi
done
rm -rf "$FETCHED"
exit 0
