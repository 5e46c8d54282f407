#!/bin/sh
# berth's buildpack runner (Heroku buildpack API v2), run inside the build container:
#   sh /buildpacks/runner.sh BUILD_DIR CACHE_DIR ENV_DIR OUT_DIR
# Picks buildpacks (BUILD_DIR/.buildpacks, $BUILDPACK_URL, else detection), runs each compile,
# writes OUT_DIR/release.yml and OUT_DIR/buildpacks. Output is not buffered: every step writes
# straight to our stdout/stderr.
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
BUILTINS="python procfile"

fail() {
    echo " !     $*" >&2
    exit 1
}

# Prints the built-in buildpack for a name given by the user, or fails saying why.
builtin_named() {
    case "$1" in
        *://* | git@* | *.git | *.tgz | *.tar.gz)
            fail "buildpack '$1': fetching buildpacks by URL is not supported yet; use a built-in: python, procfile" ;;
    esac
    for b in $BUILTINS; do
        if [ "$b" = "$1" ]; then
            echo "$b"
            return 0
        fi
    done
    fail "unknown buildpack '$1'; use a built-in: python, procfile"
}

chosen=""
if [ -f "$BUILD_DIR/.buildpacks" ]; then
    # One buildpack per line; blank lines and # comments ignored.
    while IFS= read -r line || [ -n "$line" ]; do
        name=$(printf '%s' "$line" | sed 's/#.*//; s/^[[:space:]]*//; s/[[:space:]]*$//')
        [ -n "$name" ] || continue
        b=$(builtin_named "$name") || exit 1
        chosen="$chosen $b"
    done < "$BUILD_DIR/.buildpacks"
    [ -n "$chosen" ] || fail ".buildpacks lists no buildpack; add one per line: python, procfile"
else
    url=${BUILDPACK_URL:-}
    if [ -z "$url" ] && [ -f "$ENV_DIR/BUILDPACK_URL" ]; then
        url=$(cat "$ENV_DIR/BUILDPACK_URL")
    fi
    if [ -n "$url" ]; then
        chosen=$(builtin_named "$url") || exit 1
    else
        for b in $BUILTINS; do
            if sh "$BUILDPACKS_DIR/$b/bin/detect" "$BUILD_DIR" > /dev/null 2>&1; then
                chosen=$b
                break
            fi
        done
        [ -n "$chosen" ] || fail "no buildpack detected: add a requirements.txt (or setup.py / pyproject.toml) for Python, or a Procfile for any app; or name a built-in in .buildpacks"
    fi
fi

mkdir -p "$OUT_DIR" "$CACHE_DIR" || exit 1
: > "$OUT_DIR/buildpacks"
last=""
for b in $chosen; do
    echo "-----> Using buildpack: $b"
    echo "$b" >> "$OUT_DIR/buildpacks"
    mkdir -p "$CACHE_DIR/$b"
    sh "$BUILDPACKS_DIR/$b/bin/compile" "$BUILD_DIR" "$CACHE_DIR/$b" "$ENV_DIR"
    status=$?
    [ $status -eq 0 ] || fail "buildpack $b failed to compile (exit $status)"
    last=$b
done

# Like Heroku, the last buildpack's release output decides the default process types.
sh "$BUILDPACKS_DIR/$last/bin/release" "$BUILD_DIR" > "$OUT_DIR/release.yml"
status=$?
[ $status -eq 0 ] || fail "buildpack $last: bin/release failed (exit $status)"
exit 0
