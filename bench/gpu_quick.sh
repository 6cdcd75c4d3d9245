#!/usr/bin/env bash
# A short lease: the GPU tests of one or more test files and one bench script, logs under $OUT
# (400 s for the tests, 190 s for the bench script: one device call).
#   bash bench/gpu_quick.sh "tests/test_gpu_selection.py" "bench/gpu_selection.py --seqs 32768"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
# sparsek_lowering is the folder lowering/ (pyproject maps it); without an install, a link does.
LINKS="$(mktemp -d)" && ln -s "$PWD/lowering" "$LINKS/sparsek_lowering"
export PYTHONPATH="$PWD:$LINKS${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
timeout 400 python3 -m pytest -q -x -m gpu $1 -p no:cacheprovider 2>&1 | tail -n 30 | tee "$OUT/gpu_tests.log" || status=1
timeout 190 python3 $2 --out "$OUT" 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
