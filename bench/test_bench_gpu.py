"""GPU benchmark suite (pytest-benchmark, marker ``gpu``; skipped, visibly, without CUDA): the
standard workload of DESIGN section 6 (bf16, Hq = 16, D = 128, B * S = 32K tokens,
topk = window = 1024, Hkv = 16 and 2) through the Triton backend: forward, forward+backward
and the selection alone, next to SDPA causal as the yardstick. Each benchmark checks its result
against the float64 reference first (``workloads.check_prefix``). Times are wall clock around a
synchronised call (``torch.cuda.synchronize``), after warm-up rounds.

On the lent GPU (bench/gpu_run.sh does this), against the saved H100 baseline:

    python3 -m pytest bench/test_bench_gpu.py --benchmark-storage=file://bench/baselines/h100 \
        --benchmark-compare=0001 --benchmark-compare-fail=min:40%

The report with Flex, plots and more lengths is ``bench/gpu_bench.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from workloads import Workload, check_prefix

pytestmark = pytest.mark.gpu

CASES = [(4096, 16), (32768, 16), (32768, 2)]
ROUNDS, WARMUP = 20, 3
TOL = 2e-2  # bf16 against float64, relative Frobenius error


def workload(S: int, Hkv: int) -> Workload:
    return Workload(B=32768 // S, Hq=16, Hkv=Hkv, S=S, D=128, topk=1024, window=1024, dtype=torch.bfloat16,
                    device="cuda")


def timed(benchmark, fn):
    def call():
        fn()
        torch.cuda.synchronize()

    benchmark.group = "gpu"
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=WARMUP)


@pytest.mark.parametrize("S,Hkv", CASES)
def test_forward(benchmark, S, Hkv):
    w = workload(S, Hkv)
    q, k, v, u, do = w.inputs()
    check_prefix(w, q[:1], k[:1], v[:1], u[:1], do[:1], w.run(q, k, v, u, "triton")[:1], n=2560, tol=TOL)
    timed(benchmark, lambda: w.run(q, k, v, u, "triton"))


@pytest.mark.parametrize("S,Hkv", CASES)
def test_forward_backward(benchmark, S, Hkv):
    w = workload(S, Hkv)
    q, k, v, u, do = w.inputs(grad=True)
    out, dq = w.train_step(q, k, v, u, do, "triton")
    check_prefix(w, q[:1], k[:1], v[:1], u[:1], do[:1], out[:1], dq[:1], n=2560, tol=TOL)
    timed(benchmark, lambda: w.train_step(q, k, v, u, do, "triton"))


@pytest.mark.parametrize("S,Hkv", CASES)
def test_selection(benchmark, S, Hkv):
    from sparsek_ops import selection as torch_selection
    from sparsek_ops.kernels import selection as gpu_selection

    from sparsek_ops.kernels.forward import block_queries

    w = workload(S, Hkv)
    u = w.inputs()[3]
    bm = block_queries(w.D, w.D, w.dtype, w.Hq // Hkv)  # the forward's selection, as it calls it
    sel = gpu_selection.select(u, w.topk, w.window, bm, fractional=False)
    ref = torch_selection.select(u[:1, :, :4096].cpu(), w.topk, w.window, bm, fractional=False)
    torch.testing.assert_close(sel.tau[:Hkv, :4096].cpu(), ref.tau, rtol=0, atol=1e-9)
    timed(benchmark, lambda: gpu_selection.select(u, w.topk, w.window, bm, fractional=False))


@pytest.mark.parametrize("S,Hkv", CASES)
def test_sdpa_causal(benchmark, S, Hkv):
    """The yardstick: dense causal attention (fwd+bwd) on the same inputs."""
    w = workload(S, Hkv)
    q, k, v, _, do = w.inputs(grad=True)

    def step():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != w.Hq)
        out.backward(do)
        for x in (q, k, v):
            x.grad = None
        return out

    out = step()
    G = w.Hq // Hkv
    n = 1024
    ref = F.scaled_dot_product_attention(q[:1, :, :n].double(), k[:1, :, :n].double().repeat_interleave(G, 1),
                                         v[:1, :, :n].double().repeat_interleave(G, 1), is_causal=True)
    err = ((out[:1, :, :n].double() - ref).norm() / ref.norm()).item()
    assert err <= TOL, f"SDPA differs from float64 by {err:.2e}"
    timed(benchmark, step)
