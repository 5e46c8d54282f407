# Helpers shared by the built-in buildpacks (sourced, POSIX sh).

fail() {
    echo " !     $*" >&2
    exit 1
}

warn() {
    echo " !     Warning: $*"
}

# Runs a command with its output (stdout and stderr) indented; keeps its exit status.
indented() {
    status_file=$(mktemp) || exit 1
    { "$@" 2>&1; echo $? > "$status_file"; } | while IFS= read -r line; do
        printf '       %s\n' "$line"
    done
    status=$(cat "$status_file")
    rm -f "$status_file"
    return "$status"
}

# Exports the app's config vars (one file per var in ENV_DIR) so that package managers see
# them (PIP_INDEX_URL, NPM_CONFIG_*, proxies, …); values are never printed. Variables that
# would change how the build itself runs are skipped.
export_env_dir() {
    [ -n "$1" ] && [ -d "$1" ] || return 0
    for f in "$1"/*; do
        [ -f "$f" ] || continue
        name=${f##*/}
        case "$name" in
            PATH | GIT_DIR | CPATH | CPPATH | LD_PRELOAD | LIBRARY_PATH | LD_LIBRARY_PATH | PYTHONHOME | PYTHONPATH | NODE_OPTIONS | GOROOT) continue ;;
            "" | [0-9]* | *[!A-Za-z0-9_]*) continue ;;
        esac
        export "$name=$(cat "$f")"
    done
}
