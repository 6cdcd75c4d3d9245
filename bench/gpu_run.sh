#!/usr/bin/env bash
# The lent GPU machine (the `device` tool), run from the repository root:
#   bash bench/gpu_run.sh [PART]
# PART (a device call runs at most 10 minutes, so a full run takes several calls; each part fits
# in one from a cold Triton cache, with the times measured on the H100 in session 6):
#   backward   the CUDA property suite of the Triton backward, determinism, the 128K stress
#              (test_triton_backward, test_gpu_stress, in two processes; 8 minutes in one
#              process in session 8, most of it compiling)
#   tests      every other GPU test (forward, selection, selection cache, attention, decode,
#              generate), in three pytest processes at once: nearly all of it is compiling, which
#              is CPU work (in one process it ran past 10 minutes from a cold cache in session 8)
#   lowering   the Inductor lowering's GPU tests (tests/test_lowering.py; about 8 minutes from a
#              cold cache, nearly all of it compiling: every test compiles its own graphs)
#   checks     the stress test under compute-sanitizer at a smaller S (out-of-bounds checks,
#              where the machine has it) and the whole CPU suite on that machine's torch (2.11
#              there: our oldest supported version)
#   bench      the GPU benchmark suite (bench/test_bench_gpu.py, compared with
#              bench/baselines/), the GPU report (bench/gpu_bench.py), the decode benchmark
#              (bench/gpu_decode.py) and compiled against eager (bench/gpu_compiled.py, 1.5 min)
#   ab         after kernel changes, the lease's first call (not in quick or all): the step
#              kernel by kernel (bench/profile_step.py, 32K, Hkv 16 and 2) for an older copy of the
#              package in bench/_old (bash bench/ab_old.sh REV here, then carry ["bench/_old"])
#              and for the working tree, in this one call, then bench/gpu_slots.py over
#              SLOT_CONFIGS (about 6 minutes, most of it compiling)
#   quick      backward + tests + lowering + bench; all (the default): every part, in that order.
# Every log goes under $OUT, written as the tests run (a part cut off by the device's time limit
# still leaves what it did); the last lines of each are printed at the end of its part. More
# than 8 files under $OUT at the end (the most the device tool returns) are packed into one
# archive, $OUT/gpu_run_PART.tar.gz.
set -uo pipefail
part="${1:-all}"
case "$part" in all|quick|ab|backward|tests|lowering|checks|bench) ;; *) echo "unknown part: $part" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
# sparsek_lowering is the folder lowering/ (pyproject maps it); without an install, a link does.
LINKS="$(mktemp -d)" && ln -s "$PWD/lowering" "$LINKS/sparsek_lowering"
export PYTHONPATH="$PWD:$LINKS${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY
has() { [ "$part" = "$1" ] || { [ "$1" != ab ] && { [ "$part" = all ] || { [ "$part" = quick ] && [ "$1" != checks ]; }; }; }; }
BACKWARD="tests/test_triton_backward.py tests/test_gpu_stress.py"
LOWERING="tests/test_lowering.py"
# gpu_tests LOG FILES...: the GPU tests of FILES, logged to $OUT/LOG as they run.
gpu_tests() {
  local log="$OUT/$1"; shift
  python3 -m pytest -q -m gpu "$@" -p no:cacheprovider > "$log" 2>&1
}
if has ab; then
  if [ -d bench/_old/sparsek_ops ]; then sides="old new"; else sides="new"; echo "no bench/_old: new side only"; fi
  for side in $sides; do
    path="$PYTHONPATH"; [ "$side" = old ] && path="$PWD/bench/_old:$PYTHONPATH"
    for kv in 16 2; do
      PYTHONPATH="$path" timeout 120 python3 bench/profile_step.py --S 32768 --Hkv "$kv" \
        > "$OUT/profile_${side}_${kv}.log" 2>&1 || status=1
      echo "== $side, Hkv $kv"; head -n 14 "$OUT/profile_${side}_${kv}.log"
    done
  done
  # rows:slots:warps:stages[:maxnreg] (slots.SWEEP_MAXNREG): 3 programs per SM at a cap of 168
  timeout 120 python3 bench/gpu_slots.py --configs "${SLOT_CONFIGS:-64:32:4:2,64:32:4:2:168,32:32:4:2,32:32:4:2:168,32:32:4:3:168}" \
    --out "$OUT" > "$OUT/gpu_slots.log" 2>&1 || status=1
  tail -n 8 "$OUT/gpu_slots.log"
fi
if has backward; then
  # two processes: the CUDA property suite compiles per shape, the stress test at 128K on its own
  gpu_tests gpu_tests_backward.log tests/test_triton_backward.py & p1=$!
  gpu_tests gpu_tests_stress.log tests/test_gpu_stress.py & p2=$!
  for p in $p1 $p2; do wait $p || status=1; done
  for f in backward stress; do echo "== $f"; tail -n 25 "$OUT/gpu_tests_$f.log"; done
fi
if has tests; then
  FORWARD="tests/test_triton.py"
  SELECTION="tests/test_gpu_selection.py tests/test_selection_cache.py"
  ignore=""
  for f in $BACKWARD $LOWERING $FORWARD $SELECTION; do ignore="$ignore --ignore=$f"; done
  gpu_tests gpu_tests_forward.log $FORWARD & p1=$!
  gpu_tests gpu_tests_selection.log $SELECTION & p2=$!
  gpu_tests gpu_tests_other.log tests $ignore & p3=$!
  for p in $p1 $p2 $p3; do wait $p || status=1; done
  for f in forward selection other; do echo "== $f"; tail -n 25 "$OUT/gpu_tests_$f.log"; done
fi
if has lowering; then
  gpu_tests gpu_tests_lowering.log $LOWERING || status=1
  tail -n 40 "$OUT/gpu_tests_lowering.log"
fi
if has checks; then
  san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  if [ -n "$san" ]; then
    SPARSEK_STRESS_S=4096 timeout 400 "$san" --tool memcheck --print-limit 20 \
      python3 -m pytest -q -x -m gpu tests/test_gpu_stress.py -p no:cacheprovider 2>&1 | tail -n 30 | tee "$OUT/sanitizer.log" || status=1
  else
    echo "compute-sanitizer not found on this machine" | tee "$OUT/sanitizer.log"
  fi
  workers=$(python3 -c "import os; print(min(8, os.cpu_count() or 1))")
  xdist=""
  python3 -c "import xdist" 2>/dev/null && xdist="-n $workers"
  OMP_NUM_THREADS=2 python3 -m pytest -q -m "not gpu" tests $xdist -p no:cacheprovider 2>&1 | tail -n 15 | tee "$OUT/cpu_tests.log" || status=1
fi
if has bench; then
  # The GPU benchmark suite against the saved baseline of this machine kind (h100 by default;
  # BASELINE=h200 on the other kind), then the report (JSON, markdown, plots).
  base="${BASELINE:-h100}"
  python3 -m pytest -q bench/test_bench_gpu.py -p no:cacheprovider --benchmark-storage="file://bench/baselines/$base" \
    --benchmark-compare=0001 --benchmark-compare-fail=min:40% --benchmark-columns=min,median,rounds 2>&1 \
    | tail -n 30 | tee "$OUT/gpu_bench_suite.log" || status=1
  python3 bench/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log" || status=1
  python3 bench/gpu_decode.py --out "$OUT" 2>&1 | tee "$OUT/gpu_decode.log" || status=1
  python3 bench/gpu_compiled.py --out "$OUT" 2>&1 | tee "$OUT/gpu_compiled.log" || status=1
fi
# The device tool returns at most 8 files of $OUT (session 8's bench part wrote 12, and the decode
# report did not come back): past 8, everything goes back as one archive instead.
if [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
  pack="$(mktemp -d)/gpu_run_$part.tar.gz"
  tar czf "$pack" -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv "$pack" "$OUT/" \
    && echo "more than 8 files: packed into $OUT/gpu_run_$part.tar.gz"
fi
exit $status
