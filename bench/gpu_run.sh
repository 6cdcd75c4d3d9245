#!/usr/bin/env bash
# One lease on the lent GPU machine (the `device` tool), run from the repository root:
#   bash bench/gpu_run.sh [quick]
# Records the environment, runs the GPU tests (marker `gpu`: the Triton path against the
# reference, the selection against the PyTorch one, determinism, the 128K stress), the Triton
# kernels under compute-sanitizer at a smaller S (out-of-bounds checks) where the machine has it,
# the whole CPU suite on that machine's torch (2.11 there: our oldest supported version), then
# the GPU benchmark suite (bench/test_bench_gpu.py, compared with bench/baselines/), the GPU
# report (bench/gpu_bench.py) and the decode benchmark (bench/gpu_decode.py). Every log goes under $OUT. "quick" skips the CPU suite
# and the sanitizer.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY
python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -n 40 | tee "$OUT/gpu_tests.log" || status=1
if [ "${1:-}" != "quick" ]; then
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
# The GPU benchmark suite against the saved baseline of this machine kind (h100 by default;
# BASELINE=h200 on the other kind), then the report (JSON, markdown, plots).
base="${BASELINE:-h100}"
python3 -m pytest -q bench/test_bench_gpu.py -p no:cacheprovider --benchmark-storage="file://bench/baselines/$base" \
  --benchmark-compare=0001 --benchmark-compare-fail=min:40% --benchmark-columns=min,median,rounds 2>&1 \
  | tail -n 30 | tee "$OUT/gpu_bench_suite.log" || status=1
python3 bench/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log" || status=1
python3 bench/gpu_decode.py --out "$OUT" 2>&1 | tee "$OUT/gpu_decode.log" || status=1
tail -n 3 "$OUT/gpu_tests.log"
exit $status
