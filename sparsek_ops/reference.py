"""Dense float64 reference of SPARSEK attention: DESIGN.md section 2, written as plainly as
possible. Small shapes only (O(S^2) memory, a Python loop over queries). Gradients come from
autograd, so this is also the reference for the backward kernels.

Every other implementation in the package is tested against this file.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def capped_simplex_threshold(z: Tensor, k: int) -> Tensor:
    """tau with ``sum_j clip(z_j - tau, 0, 1) = k`` for every row of ``z [..., n]`` (float64).

    Plain O(n^2): evaluate ``f(t) = sum_j clip(z_j - t, 0, 1)`` at every breakpoint (``z_j`` and
    ``z_j - 1``), take the largest breakpoint with ``f >= k``; f is linear up to the next
    breakpoint, with ``A`` (entries at 1) and ``F`` (fractional entries) fixed there, so
    ``tau = (sum_F z + |A| - k) / |F|``. Differentiable in z. ``n <= k`` gives -inf;
    a row with a non-finite entry gives NaN.
    """
    n = z.shape[-1]
    bad = ~torch.isfinite(z).all(-1)
    if n <= k:
        return torch.where(bad, float("nan"), torch.full(z.shape[:-1], float("-inf"), dtype=z.dtype, device=z.device))
    zd = torch.where(torch.isfinite(z), z, 0.0).detach()
    bps = torch.cat([zd, zd - 1], -1)
    f = (zd[..., None, :] - bps[..., :, None]).clamp(0, 1).sum(-1)
    b_lo = torch.where(f >= k, bps, float("-inf")).amax(-1, keepdim=True)
    b_hi = torch.where(bps > b_lo, bps, float("inf")).amin(-1, keepdim=True)
    mid = (b_lo + b_hi) / 2  # no breakpoint strictly between b_lo and b_hi
    ones = zd - mid >= 1
    frac = (zd - mid > 0) & ~ones
    n_frac = frac.sum(-1)
    zz = torch.where(torch.isfinite(z), z, 0.0)
    tau = ((zz * frac).sum(-1) + ones.sum(-1) - k) / n_frac.clamp_min(1)
    tau = torch.where(n_frac > 0, tau, b_lo.squeeze(-1))  # f flat at k: the largest root
    return torch.where(bad, float("nan"), tau)


def clip01(x: Tensor) -> Tensor:
    """``clip(x, 0, 1)`` whose gradient is 1 strictly inside (0, 1) and 0 elsewhere, kinks included:
    the convention of DESIGN.md section 3, fact 5 (F is defined with strict inequalities)."""
    inner = (x > 0) & (x < 1)
    return torch.where(inner | torch.isnan(x), x, (x >= 1).to(x.dtype))


def topk_mask(z: Tensor, k: int, dim: int = -1) -> Tensor:
    """Projection of ``z`` onto ``{0 <= p <= 1, sum p = k}`` along ``dim``, in float64."""
    zt = z.movedim(dim, -1).to(torch.float64)
    if k == 0:
        p = torch.where(torch.isfinite(zt).all(-1, keepdim=True), torch.zeros_like(zt), float("nan"))
    else:
        tau = capped_simplex_threshold(zt, k)[..., None]
        p = torch.where(tau == float("-inf"), torch.ones_like(zt), clip01(zt - tau))
    return p.movedim(-1, dim)


def attention_weights(u: Tensor, topk: int, window: int) -> tuple[Tensor, Tensor]:
    """Weights ``p [B, H, S, S]`` (float64, differentiable in u) and the attended mask ``[B, H, S, S]``.

    Row i: the window ``max(0, i-window+1) <= j <= i`` with weight 1, and the top-k candidates
    ``j <= i - window`` (ties to the earlier position) with weight ``clip(u_j - tau_i, 0, 1)``.
    """
    B, H, S = u.shape
    u = u.to(torch.float64)
    rows, masks = [], []
    for i in range(S):
        p_row = u.new_zeros(B, H, S)
        m_row = torch.zeros(B, H, S, dtype=torch.bool, device=u.device)
        if window > 0:
            lo = max(0, i - window + 1)
            p_row[..., lo: i + 1] = 1.0
            m_row[..., lo: i + 1] = True
        n = max(0, i + 1 - window)  # candidates 0 .. n-1
        if n > 0 and topk > 0:
            cand = u[..., :n]
            tau = capped_simplex_threshold(cand, topk)[..., None]
            order = torch.sort(cand.detach(), dim=-1, descending=True, stable=True).indices[..., :topk]
            chosen = torch.zeros(B, H, n, dtype=torch.bool, device=u.device).scatter_(-1, order, True)
            w = torch.where(tau == float("-inf"), torch.ones_like(cand), clip01(cand - tau))
            p_row = torch.cat([torch.where(chosen, w, 0.0), p_row[..., n:]], -1)
            m_row[..., :n] = chosen
        rows.append(p_row)
        masks.append(m_row)
    return torch.stack(rows, -2), torch.stack(masks, -2)


def attention(q: Tensor, k: Tensor, v: Tensor, u: Tensor, topk: int, window: int,
              scale: float | None = None, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """SPARSEK attention, dense. q [B, Hq, S, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], u [B, Hkv, S].

    Returns out [B, Hq, S, Dv] and lse [B, Hq, S], both in ``dtype``. The weights are always
    computed in float64; ``dtype`` sets the precision of the attention itself, so a low
    precision call is the "same-dtype PyTorch reference" of the tolerance model.
    """
    G = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p, mask = attention_weights(u, topk, window)
    p = p.repeat_interleave(G, dim=1).to(dtype)
    mask = mask.repeat_interleave(G, dim=1)
    qd = q.to(dtype)
    kd = k.repeat_interleave(G, dim=1).to(dtype)
    vd = v.repeat_interleave(G, dim=1).to(dtype)
    s = (scale * p * (qd @ kd.transpose(-1, -2))).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    a = torch.softmax(s, -1)
    return (a * p) @ vd, lse
