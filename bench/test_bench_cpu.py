"""CPU benchmark suite (pytest-benchmark), small enough for CI: the PyTorch backend's forward,
forward+backward and selection, next to dense causal SDPA on the same inputs (the yardstick of
the machine's speed). Each benchmark checks its result against the float64 reference first.

Run, and compare against the saved baseline of this machine kind (README, "Benchmarks"):

    python -m pytest bench/test_bench_cpu.py --benchmark-storage=file://bench/baselines/cpu \
        --benchmark-compare=0001 --benchmark-compare-fail=min:150%

Workload: float32, B = 1, Hq = 8, Hkv = 2, D = 64, topk = window = 256.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from workloads import Workload, check_prefix

from sparsek_ops import selection
from sparsek_ops.reference import capped_simplex_threshold

SEQS = [2048, 8192]


def workload(S: int) -> Workload:
    return Workload(B=1, Hq=8, Hkv=2, S=S, D=64, topk=256, window=256, dtype=torch.float32, device="cpu")


@pytest.fixture(autouse=True)
def _grouped(benchmark):
    benchmark.group = "cpu"


@pytest.mark.parametrize("S", SEQS)
def test_forward(benchmark, S):
    w = workload(S)
    q, k, v, u, do = w.inputs()
    with torch.no_grad():
        check_prefix(w, q, k, v, u, do, w.run(q, k, v, u))
        benchmark.extra_info["gflop"] = w.flops / 1e9
        benchmark(w.run, q, k, v, u)


@pytest.mark.parametrize("S", SEQS)
def test_forward_backward(benchmark, S):
    w = workload(S)
    q, k, v, u, do = w.inputs(grad=True)
    out, dq = w.train_step(q, k, v, u, do)
    check_prefix(w, q, k, v, u, do, out, dq)
    benchmark(w.train_step, q, k, v, u, do)


@pytest.mark.parametrize("S", SEQS)
def test_selection(benchmark, S):
    """tau, eviction and gather lists for the forward's blocks (what every call computes first)."""
    w = workload(S)
    u = w.inputs()[3].detach()
    sel = selection.select(u, w.topk, w.window, 128, fractional=False)
    n = 1024  # tau of a prefix is the prefix's own: check the first rows against the reference
    cand = u[..., : n - w.window].double()
    tau_ref = torch.stack([capped_simplex_threshold(cand[..., : i - w.window + 1], w.topk)
                           for i in range(w.window + w.topk, n)], -1)
    torch.testing.assert_close(sel.tau[..., w.window + w.topk: n].view_as(tau_ref), tau_ref)
    benchmark(selection.select, u, w.topk, w.window, 128, fractional=False)


@pytest.mark.parametrize("S", SEQS)
def test_sdpa_causal(benchmark, S):
    """The machine's yardstick: dense causal attention on the same q, k, v (GQA expanded)."""
    w = workload(S)
    q, k, v, _, _ = w.inputs()
    G = w.Hq // w.Hkv
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    with torch.no_grad():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        ref = F.scaled_dot_product_attention(q[:, :, :512].double(), k[:, :, :512].double(), v[:, :, :512].double(),
                                             is_causal=True)
        torch.testing.assert_close(out[:, :, :512].double(), ref, atol=1e-5, rtol=1e-4)
        benchmark(F.scaled_dot_product_attention, q, k, v, is_causal=True)
