"""Inputs of the benchmark suites (``test_bench_cpu.py``, ``test_bench_gpu.py``) and the checks
each benchmark passes before it is timed.

The checks use causality: output row i and dq row i depend only on positions 0 .. i (the
selection of query i included), so the first ``n`` rows of a long call must equal the float64
reference (``sparsek_ops.reference``) run on the first ``n`` positions alone. That is exact, cheap
(the reference is O(n^2)) and covers the selection as soon as ``n > topk + window``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsek_ops import reference, sparsek_attention


@dataclass(frozen=True)
class Workload:
    B: int
    Hq: int
    Hkv: int
    S: int
    D: int
    topk: int
    window: int
    dtype: torch.dtype
    device: str

    def inputs(self, grad: bool = False, seed: int = 0):
        """q [B, Hq, S, D], k, v [B, Hkv, S, D], u [B, Hkv, S] (float32), do [B, Hq, S, D]."""
        g = torch.Generator(device=self.device).manual_seed(seed)

        def randn(*shape, dtype=self.dtype):
            return torch.randn(*shape, generator=g, device=self.device, dtype=dtype)

        q = randn(self.B, self.Hq, self.S, self.D)
        k = randn(self.B, self.Hkv, self.S, self.D)
        v = randn(self.B, self.Hkv, self.S, self.D)
        u = randn(self.B, self.Hkv, self.S, dtype=torch.float32) * 2
        do = randn(self.B, self.Hq, self.S, self.D)
        leaves = [x.requires_grad_(grad) for x in (q, k, v, u)]
        return (*leaves, do)

    def run(self, q, k, v, u, backend: str = "auto"):
        return sparsek_attention(q, k, v, u, topk=self.topk, window=self.window, backend=backend)

    def train_step(self, q, k, v, u, do, backend: str = "auto"):
        """Forward and backward, the gradients dropped after (a training step's
        ``zero_grad(set_to_none=True)``). Returns out and dq, for the checks."""
        out = self.run(q, k, v, u, backend)
        out.backward(do)
        dq = q.grad
        for x in (q, k, v, u):
            x.grad = None
        return out, dq

    @property
    def flops(self) -> float:
        """Forward FLOPs by DESIGN section 6: 4 * S * (topk + window) * D * Hq * B."""
        return 4.0 * self.S * (self.topk + self.window) * self.D * self.Hq * self.B


def prefix_reference(w: Workload, q, k, v, u, do, n: int):
    """float64 out and dq of the first n positions, from the reference on those positions (on the
    inputs' device)."""
    with torch.enable_grad():
        leaves = [x.detach()[:, :, :n].double().requires_grad_() for x in (q, k, v, u)]
        out, _ = reference.attention(*leaves, w.topk, w.window)
        (dq,) = torch.autograd.grad(out, leaves[0], do[:, :, :n].double())
    return out.detach(), dq


def check_prefix(w: Workload, q, k, v, u, do, out, dq=None, n: int | None = None, tol: float = 1e-4) -> None:
    """Assert that the first n rows of out (and dq, if given) match the float64 reference:
    relative Frobenius error at most tol."""
    n = min(w.S, n or 2 * (w.topk + w.window) + 64)
    ref_out, ref_dq = prefix_reference(w, q, k, v, u, do, n)
    pairs = [("out", out, ref_out)] + ([("dq", dq, ref_dq)] if dq is not None else [])
    for name, got, ref in pairs:
        got = got.detach()[:, :, :n].double()
        err = ((got - ref).norm() / ref.norm()).item()
        assert err <= tol, f"{name} of the first {n} rows differs from the float64 reference: rel. error {err:.2e} > {tol:.0e}"
