# Shared by scripts/test and scripts/venv (source it).
#
# `find_python X.Y` prints the path of a CPython X.Y interpreter, or nothing (status 1) when
# the machine has none. It looks, in order, at pyenv's installed versions (the newest patch
# release first; pyenv's root from `pyenv root`, else $PYENV_ROOT, else ~/.pyenv, so pyenv
# need not be on PATH), then at `pythonX.Y` on PATH. Each candidate is run once to check that
# it really is X.Y: a pyenv shim for a version that is not selected fails that check.
find_python() {
    local want=$1 root dir candidate
    local -a candidates=()
    root=$(pyenv root 2>/dev/null) || root=${PYENV_ROOT:-$HOME/.pyenv}
    if [ -d "$root/versions" ]; then
        while IFS= read -r dir; do
            candidates+=("$root/versions/$dir/bin/python$want")
        done < <(find "$root/versions" -mindepth 1 -maxdepth 1 -printf '%f\n' \
            | grep -E "^${want//./\\.}\.[0-9]+$" | sort -t. -k3,3nr)
    fi
    candidate=$(command -v "python$want" 2>/dev/null) && candidates+=("$candidate")
    for candidate in "${candidates[@]}"; do
        if [ -x "$candidate" ] && [ "$("$candidate" -c \
            'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$want" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}
