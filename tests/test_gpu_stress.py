"""Long-sequence stress of the Triton path (`gpu` marker; bench/gpu_run.sh runs it).

S = 128K, bf16, the standard heads: forward and backward must be finite everywhere, and sampled
query rows must match a float64 recomputation from the same selection (the selection itself is
checked against the PyTorch one in test_gpu_selection.py). ``SPARSEK_STRESS_S`` shrinks the
sequence, for runs under compute-sanitizer (bench/gpu_run.sh does that for out-of-bounds checks).
"""

import math
import os

import pytest
import torch

import sparsek_ops
from sparsek_ops.kernels import selection as gpu_selection

S_STRESS = int(os.environ.get("SPARSEK_STRESS_S", 131072))


def sampled_reference(q, k, v, u, topk, window, rows, scale):
    """float64 outputs of query positions ``rows`` (all heads), from the selection's tau/evict."""
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    sel = gpu_selection.select(u, topk, window, 64, fractional=False)
    out = torch.empty(B, Hq, len(rows), v.shape[-1], dtype=torch.float64, device=q.device)
    j = torch.arange(S, device=q.device)
    for bi in range(B):
        for h in range(Hkv):
            r = bi * Hkv + h
            ev = sel.evict[r].long()
            for n, i in enumerate(rows):
                chosen = (j + window <= i) & (i < ev)
                win = (j <= i) & (j > i - window)
                keys = torch.nonzero(chosen | win).flatten()
                p = torch.where(win[keys], 1.0, (u[bi, h, keys].double() - sel.tau[r, i]).clamp(0, 1))
                kk, vv = k[bi, h, keys].double(), v[bi, h, keys].double()
                for g in range(G):
                    s = scale * p * (kk @ q[bi, h * G + g, i].double())
                    a = torch.softmax(s, 0)
                    out[bi, h * G + g, n] = (a * p) @ vv
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("Hkv", [16, 2])
def test_long_sequence_is_finite_and_matches_sampled_rows(Hkv):
    S, Hq, D = S_STRESS, 16, 128
    topk = window = min(1024, S // 8)  # small S (sanitizer runs) must still have fractional pairs
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, Hq, S, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(1, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(1, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    u = (torch.randn(1, Hkv, S, device="cuda", generator=g) * 2).requires_grad_()
    out = sparsek_ops.sparsek_attention(q, k, v, u, topk=topk, window=window, backend="triton")
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    for name, x in zip("qkvu", (q, k, v, u)):
        assert torch.isfinite(x.grad).all(), f"d{name} has non-finite values"
        assert x.grad.abs().sum() > 0, f"d{name} is all zero"
    rows = sorted({min(r, S - 1) for r in (0, 1, window - 1, window + topk, S // 3, S - 2, S - 1)})
    ref = sampled_reference(q.detach(), k.detach(), v.detach(), u.detach(), topk, window, rows, 1 / math.sqrt(D))
    got = out.detach()[:, :, rows].double()
    err = (got - ref).abs().max().item()
    assert err < 2e-2, f"sampled rows differ from the float64 recomputation by {err}"
