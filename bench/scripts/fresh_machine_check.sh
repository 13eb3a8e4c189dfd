#!/usr/bin/env bash
# Fresh-machine check: clone the repository into an empty folder, run README's first set-up
# command (the main job) exactly as written, in a new virtual environment, and check that the
# main job's reports appear.  README's second command (the tests) is what CI runs already, the
# same way; pass --tests to run it here too.
#
#   bash bench/scripts/fresh_machine_check.sh [REPO_URL_OR_PATH] [--tests]
#
# Writes a JSON summary to $OUT (default: ./fresh-machine-check.json) with each command's wall time
# and exit status.
set -euo pipefail
SRC=${1:-$(cd "$(dirname "$0")/../.." && pwd)}
RUN_TESTS=0
[ "${2:-}" = "--tests" ] && RUN_TESTS=1
OUT=${OUT:-$PWD/fresh-machine-check.json}
WORK=$(mktemp -d -t dafar-fresh-XXXXXX)
echo "cloning $SRC into $WORK/repo" >&2
git clone -q "$SRC" "$WORK/repo"
cd "$WORK/repo"
# The first fenced block of README.md holds exactly two commands: main job, then tests.
mapfile -t CMDS < <(awk '/^```/{n++; next} n==1 && NF && $1 !~ /^#/' README.md)
[ "${#CMDS[@]}" = 2 ] || { echo "README's first block should hold exactly two commands, found ${#CMDS[@]}" >&2; exit 2; }
run() {
  local label=$1 cmd=$2 t0 status
  echo "== $label: $cmd" >&2
  t0=$(date +%s)
  set +e
  bash -c "$cmd" >"$WORK/$label.log" 2>&1
  status=$?
  set -e
  echo "$label $status $(( $(date +%s) - t0 ))"
}
RESULTS=$(run main "${CMDS[0]}")
if [ $RUN_TESTS = 1 ]; then
  rm -rf .venv
  RESULTS="$RESULTS
$(run tests "${CMDS[1]}")"
fi
REPORTS=$(ls runs/*/report.md runs/*/quantize_report.md runs/*/bench_report.md 2>/dev/null | tr '\n' ' ')
python3 - "$OUT" "$WORK" "$REPORTS" <<PY
import json, sys
out, work, reports = sys.argv[1], sys.argv[2], sys.argv[3].split()
rows = []
for line in """$RESULTS""".strip().splitlines():
    label, status, secs = line.split()
    rows.append({"command": label, "exit": int(status), "seconds": int(secs), "log": f"{work}/{label}.log"})
ok = all(r["exit"] == 0 for r in rows) and len(reports) >= 3
json.dump({"clone": work + "/repo", "commands": rows, "reports": reports, "ok": ok}, open(out, "w"), indent=2)
print(json.dumps({"ok": ok, "commands": rows, "reports": reports}, indent=2))
sys.exit(0 if ok else 1)
PY
