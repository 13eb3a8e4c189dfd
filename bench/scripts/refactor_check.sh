#!/usr/bin/env bash
# Issue 19's check: the same stage commands on the commit before the structure refactor (2973920)
# and on the one that finished it (44407f9), each from its own worktree and virtual environment
# (a copy of this clone's .venv with dafar re-installed from the worktree), then
# bench/scripts/compare_runs.py on the two run folders.  About 9 minutes on a 2-core VM.
# Usage (from the repository root): bash bench/scripts/refactor_check.sh [OUT=/tmp/cmp19]
set -u
OUT=${1:-/tmp/cmp19}
ROOT=$(pwd)
for pair in old:2973920 new:44407f9; do
  tag=${pair%%:*}; rev=${pair#*:}
  git worktree add -f "$OUT/src-$tag" "$rev" -q
  cp -a "$ROOT/.venv" "$OUT/v$tag" && "$OUT/v$tag/bin/python" -m pip install -q --no-deps -e "$OUT/src-$tag"
done
for tag in old new; do
  V=$OUT/v$tag; R=$OUT/$tag/run
  mkdir -p "$OUT/$tag"; cd "$OUT/$tag" || exit 1
  t0=$(date +%s)
  $V/bin/python -m dafar train --dataset mnist --profile quick --threads 2 --quiet --out $R > log.txt 2>&1; echo "$tag train rc=$? $(( $(date +%s)-t0 ))s"
  $V/bin/python -m dafar export $R --detector l2 --input uint8-nhwc --quiet >> log.txt 2>&1; echo "$tag export rc=$? $(( $(date +%s)-t0 ))s"
  $V/bin/python -m dafar quantize $R --detector l2 --input uint8-nhwc --attack-images 100 --quiet >> log.txt 2>&1; echo "$tag quantize rc=$? $(( $(date +%s)-t0 ))s"
  $V/bin/python -m dafar bench $R --accuracy-images 1000 --min-seconds 0.2 --runs 5 --no-memory --quiet >> log.txt 2>&1; echo "$tag bench rc=$? $(( $(date +%s)-t0 ))s"
done
cd "$ROOT" && "$ROOT/.venv/bin/python" bench/scripts/compare_runs.py "$OUT/old/run" "$OUT/new/run"
