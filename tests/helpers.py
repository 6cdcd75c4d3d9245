"""Shared test helpers: input makers and the tolerance model of DESIGN.md section 5."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import pytest
import torch

from sparsek_ops import reference, sparsek_attention

# Absolute slack per dtype, relative to the size of the reference values.
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@dataclass
class Problem:
    B: int
    Hq: int
    Hkv: int
    S: int
    D: int
    Dv: int
    topk: int
    window: int
    dtype: torch.dtype = torch.float32
    scores: str = "normal"  # normal | ties | large | plateau
    contiguous: bool = True
    seed: int = 0
    device: str = "cpu"

    def make(self, requires_grad: bool = False):
        """q, k, v (self.dtype) and u (float32; float64 for float64 problems), made in float64 and
        rounded, so every dtype sees the same underlying values."""
        g = torch.Generator().manual_seed(self.seed)

        def rnd(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        q = rnd(self.B, self.Hq, self.S, self.D)
        k = rnd(self.B, self.Hkv, self.S, self.D)
        v = rnd(self.B, self.Hkv, self.S, self.Dv)
        if self.scores == "ties":  # few distinct values, gaps < 1: ties but no plateau
            pool = torch.rand(4, generator=g, dtype=torch.float64) * 0.9
            u = pool[torch.randint(0, 4, (self.B, self.Hkv, self.S), generator=g)]
        elif self.scores == "plateau":  # integers: ties and plateaus of f
            u = torch.randint(-3, 4, (self.B, self.Hkv, self.S), generator=g).to(torch.float64)
        elif self.scores == "large":
            u = rnd(self.B, self.Hkv, self.S) * 1e4
        else:
            u = rnd(self.B, self.Hkv, self.S) * 2
        u_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        out = []
        for x, dt in ((q, self.dtype), (k, self.dtype), (v, self.dtype), (u, u_dtype)):
            x = x.to(dt)
            if not self.contiguous:  # same values, every other element of a wider tensor
                x = torch.stack([x, torch.zeros_like(x)], -1)[..., 0]
            out.append(x.to(self.device).requires_grad_(requires_grad))
        return out

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.D)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_model(name: str, got: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor,
                        dtype: torch.dtype) -> None:
    """DESIGN.md section 5: |got - ref64| <= 2 |ref_lowp - ref64| + atol (atol scaled by the size
    of the reference values)."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    mag = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    err, ref_err = max_err(got, ref64), max_err(ref_lowp, ref64)
    bound = 2 * ref_err + ATOL[dtype] * mag
    assert err <= bound, f"{name}: error {err:.3g} > 2 x {ref_err:.3g} (same-dtype reference) + {ATOL[dtype] * mag:.3g}"


def reference_run(prob: Problem, q, k, v, u, dtype, grads=None):
    """(out, lse) of the reference computed in ``dtype`` and, if ``grads = (go, glse)`` is given,
    the gradients of q, k, v, u of ``sum(out * go) + sum(lse * glse)``."""
    leaves = [x.detach().cpu().clone().requires_grad_(grads is not None) for x in (q, k, v, u)]
    out, lse = reference.attention(*leaves, prob.topk, prob.window, prob.scale, dtype=dtype)
    if grads is None:
        return out, lse, None
    go, gl = grads
    loss = (out.double() * go.double()).sum() + (lse.double() * gl.double()).sum()
    return out, lse, torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)


def count_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` (for the test's duration) so that each call appends 1 to the
    returned list and then runs the real function."""
    calls, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


# Triton's interpreter serves only where there is no GPU (conftest sets TRITON_INTERPRET=1 then).
needs_interpreter = pytest.mark.skipif(torch.cuda.is_available(),
                                       reason="the interpreter runs only where there is no GPU; see the gpu tests")


@contextmanager
def launch_config(module, cfg):
    """Make ``module.config`` (a kernel module's launch-configuration chooser) return cfg, so
    short test inputs still cover many tiles or splits; None: the kernel's own choice."""
    if cfg is None:
        yield
        return
    with mock.patch.object(module, "config", lambda *args: cfg):
        yield


class TinyAttention(torch.nn.Module):
    """Projections, a scoring network and SPARSEK attention (GQA): the op inside a model, for the
    torch.compile tests."""

    def __init__(self, d, heads, kv_heads, topk, window):
        super().__init__()
        self.h, self.kv, self.topk, self.window = heads, kv_heads, topk, window
        self.dh = d // heads
        self.q = torch.nn.Linear(d, heads * self.dh)
        self.kvp = torch.nn.Linear(d, 2 * kv_heads * self.dh)
        self.score = torch.nn.Linear(d, kv_heads)

    def forward(self, x):
        B, S, _ = x.shape
        q = self.q(x).view(B, S, self.h, self.dh).transpose(1, 2)
        k, v = self.kvp(x).view(B, S, 2, self.kv, self.dh).permute(2, 0, 3, 1, 4)
        u = self.score(x).transpose(1, 2)
        o = sparsek_attention(q, k, v, u, topk=self.topk, window=self.window)
        return o.transpose(1, 2).reshape(B, S, -1)
