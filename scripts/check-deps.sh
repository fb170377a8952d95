#!/usr/bin/env bash
# Do the dependency ranges in pyproject.toml hold at both ends? Each mode builds a fresh
# virtualenv in a temporary directory (removed at exit), installs through
# scripts/install-test-deps.sh without constraints.txt, prints how the versions differ from
# constraints.txt, then runs ruff, ruff format, mypy and the test suite:
#
#   latest  the newest release of every package that the ranges allow
#   lowest  every direct dependency at its declared lower bound (the rest as pip resolves them)
#
#   scripts/check-deps.sh latest [--write-constraints | --if-changed] [-- PYTEST_ARGS...]
#   scripts/check-deps.sh lowest [-- PYTEST_ARGS...]
#
# --write-constraints: when every step passed, rewrite constraints.txt with the versions this run
# used, so that the README's test command installs them from then on.
# --if-changed: stop with a pass when every version equals constraints.txt (.ci/run uses it:
# its earlier steps have just tested exactly those versions).
# The suite runs on TASKSTREAM_TEST_DATABASE_URL when set (faster), else on the embedded
# PostgreSQL. The last lines sum up each step; the exit status is 1 when one failed, 2 on misuse.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    sed -n '10,11p' "$0" | sed 's/^#  *//' >&2
    exit 2
}
mode=${1:-}
[ "$mode" = latest ] || [ "$mode" = lowest ] || usage
shift
write_constraints=0
if_changed=0
pytest_args=()
while [ $# -gt 0 ]; do
    case $1 in
        --write-constraints) [ "$mode" = latest ] || usage; write_constraints=1 ;;
        --if-changed) [ "$mode" = latest ] || usage; if_changed=1 ;;
        --) shift; pytest_args=("$@"); break ;;
        *) usage ;;
    esac
    shift
done
if [ "$write_constraints" -eq 1 ] && [ ${#pytest_args[@]} -gt 0 ]; then
    echo "check-deps: --write-constraints needs the whole suite (no pytest arguments)" >&2
    exit 2
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/check-deps.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
# shellcheck disable=SC1091
. "$tmp/venv/bin/activate"
if [ "$(python3 -c 'import sys; print(sys.prefix)')" != "$tmp/venv" ]; then
    echo "check-deps: python3 is not the fresh virtualenv's" >&2
    exit 1
fi

if [ "$mode" = lowest ]; then
    # "name>=X" becomes "name==X" for every direct dependency of the project and its extras; a
    # dependency without a lower bound is an error, since nothing proves it.
    python3 - "$tmp/lowest.txt" <<'EOF'
import re
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
requirements = list(project["dependencies"])
for extra in project["optional-dependencies"].values():
    requirements += extra
pins: dict[str, str] = {}
for requirement in requirements:
    match = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*(\[[^\]]*\])?\s*([^;]*)(;.*)?", requirement)
    assert match, requirement
    name = re.sub(r"[-_.]+", "-", match[1]).lower()
    if name == project["name"]:
        continue  # an extra pulling in another extra ("taskstream[client]")
    lower = re.search(r"(?:>=|==)\s*([^,\s]+)", match[3])
    if lower is None:
        sys.exit(f"check-deps: {requirement!r} has no lower bound (>= or ==); declare one")
    if pins.setdefault(name, lower[1]) != lower[1]:
        sys.exit(f"check-deps: {name} is declared with two lower bounds; make them agree")
with open(sys.argv[1], "w") as f:
    f.writelines(f"{name}=={version}\n" for name, version in sorted(pins.items()))
EOF
    echo "== check-deps lowest: direct dependencies pinned to their lower bounds"
    sed 's/^/    /' "$tmp/lowest.txt"
    install_constraints=$tmp/lowest.txt
else
    install_constraints=
fi

results=()
failed=0
record() { # name, exit status, seconds
    if [ "$2" -eq 0 ]; then
        results+=("$(printf '%-13s passed  %5ss' "$1" "$3")")
    else
        results+=("$(printf '%-13s FAILED  %5ss  (exit %s)' "$1" "$3" "$2")")
        failed=1
    fi
}
step() { # name, command...
    local name=$1 start=$SECONDS rc=0
    shift
    echo "== check-deps $mode: $name"
    "$@" || rc=$?
    record "$name" "$rc" $((SECONDS - start))
}
summary() {
    echo
    echo "== check-deps $mode: summary ($(python3 --version), $((SECONDS - began)) s in all)"
    printf '    %s\n' "${results[@]}"
    [ -z "${pytest_line:-}" ] || echo "    pytest: $pytest_line"
    if [ "$failed" -eq 0 ]; then
        echo "== check-deps $mode: PASSED"
    else
        echo "== check-deps $mode: FAILED"
    fi
}
began=$SECONDS

step install env TASKSTREAM_CONSTRAINTS="$install_constraints" bash scripts/install-test-deps.sh
if [ "$failed" -ne 0 ]; then
    summary
    exit 1
fi

python3 -m pip freeze --exclude-editable --exclude taskstream | grep -v '^#' >"$tmp/freeze.txt"
echo "== check-deps $mode: versions against constraints.txt (what CI last proved)"
if python3 - constraints.txt "$tmp/freeze.txt" <<'EOF'
import os
import re
import sys


def versions(path: str) -> dict[str, str]:
    found: dict[str, str] = {}
    if not os.path.exists(path):
        print(f"    ({path} is missing: every package shows as added)")
        return found
    with open(path) as f:
        for line in f:
            name, sep, version = line.split("#")[0].strip().partition("==")
            if sep:
                found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found


proved, ran = versions(sys.argv[1]), versions(sys.argv[2])
rows = []
for name in sorted(proved.keys() | ran.keys()):
    old, new = proved.get(name), ran.get(name)
    if old != new:
        kind = "changed" if old and new else ("added" if new else "dropped")
        rows.append(f"    {kind:<8} {name:<28} {old or '-':>12} -> {new or '-'}")
print("\n".join(rows) if rows else "    none: every version equals constraints.txt")
print(f"    ({len(rows)} of {len(ran)} installed packages differ)")
sys.exit(1 if rows else 0)
EOF
then
    unchanged=1
else
    unchanged=0
fi
if [ "$if_changed" -eq 1 ] && [ "$unchanged" -eq 1 ]; then
    results+=("nothing new: the newest allowed versions are those in constraints.txt")
    summary
    exit 0
fi

step "ruff check" ruff check server tests bench
step "ruff format" ruff format --check server tests bench
step mypy mypy --cache-dir "$tmp/mypy-cache"
start=$SECONDS
rc=0
echo "== check-deps $mode: pytest"
python3 -m pytest "${pytest_args[@]}" 2>&1 | tee "$tmp/pytest.log" || rc=$?
record pytest "$rc" $((SECONDS - start))
# pytest's own last line: "3 failed, 412 passed, 2 warnings in 301.2s" (or "no tests ran").
pytest_line=$(grep -E '(passed|failed|error|no tests ran).* in [0-9.]+s' "$tmp/pytest.log" \
    | tail -n 1 | sed -E 's/^=+ //; s/ =+$//') || true

summary
if [ "$write_constraints" -eq 1 ]; then
    if [ "$failed" -ne 0 ]; then
        echo "check-deps: constraints.txt left as it was (a step failed)" >&2
    else
        {
            echo "# The exact versions CI last proved (scripts/install-test-deps.sh installs with"
            echo "# -c constraints.txt). Do not edit: change the ranges in pyproject.toml, then run"
            echo "# scripts/check-deps.sh latest --write-constraints."
            echo "# Written $(date -u +%Y-%m-%d) with $(python3 --version) on $(uname -m)."
            cat "$tmp/freeze.txt"
        } >constraints.txt
        echo "check-deps: constraints.txt rewritten ($(wc -l <"$tmp/freeze.txt") packages)"
    fi
fi
exit "$failed"
