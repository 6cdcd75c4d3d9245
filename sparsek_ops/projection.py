"""The SPARSEK operator: Euclidean projection onto the capped simplex.

For a score vector ``z`` of length ``n`` and an integer budget ``k``::

    P_k(z) = argmin_p ||p - z||^2   subject to   0 <= p <= 1,  sum(p) = k
           = clip(z - tau, 0, 1)

where ``tau`` solves ``f(tau) = sum_j clip(z_j - tau, 0, 1) = k``.

Facts used everywhere in this package (DESIGN.md, sections 2 and 3):

* ``f`` is continuous, non-increasing and piecewise linear, with breakpoints at every
  ``z_j`` and ``z_j - 1``. Between two consecutive breakpoints its slope is ``-|F|``,
  ``F = {j : tau < z_j < tau + 1}`` (the *fractional* entries).
* Where ``f = k`` on a whole interval (no fractional entry), we take the largest root.
  Every root gives the same ``p``.
* ``n <= k``: every entry gets weight 1 and ``tau = -inf``; ``k = 0``: every weight is 0.
* The Jacobian of ``p`` is ``dp_j/dz_l = [j in F] ([j = l] - [l in F] / |F|)``.

This module holds the row-wise version (``topk_mask``); ``selection.py`` solves the same
equation for every prefix of a sequence at once and shares ``solve_in_bracket``.
"""

from __future__ import annotations

import torch
from torch import Tensor


# f is evaluated from prefix sums, so it carries rounding error; where f equals k on a whole
# interval (a plateau), this slack makes every implementation pick its right end, the largest root.
F_SLACK = 1e-9


def solve_in_bracket(b_lo: Tensor, f_lo: Tensor, n_frac: Tensor, k: int, b_hi: Tensor) -> Tensor:
    """The root of ``f = k`` in ``[b_lo, b_hi)``, where ``f`` is linear with slope ``-n_frac``.

    ``b_lo`` is the largest breakpoint with ``f(b_lo) >= k``. ``n_frac == 0`` means ``f`` is
    flat there (a plateau, or rounding picked a flat piece): ``b_lo`` is then a root.
    The clamp absorbs rounding in ``f_lo``.
    """
    step = (f_lo - k) / n_frac.clamp_min(1).to(f_lo.dtype)
    tau = torch.where(n_frac > 0, b_lo + step, b_lo)
    return torch.minimum(torch.maximum(tau, b_lo), b_hi)


def _gt_stats(sorted_x: Tensor, csum: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Count and sum of the entries of each row of ``sorted_x`` (ascending) that exceed ``t``."""
    n = sorted_x.shape[-1]
    le = torch.searchsorted(sorted_x, t, right=True)
    return n - le, csum[..., -1:] - csum.gather(-1, le)


def threshold(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``tau`` and ``|F|`` for every row of ``z [..., n]`` (float64), in O(n log n).

    Rows holding a non-finite value get ``tau = NaN``. Returns ``(tau [...], n_frac [...])``.
    """
    n = z.shape[-1]
    batch = z.shape[:-1]
    finite = torch.isfinite(z).all(-1)
    if n <= k or n == 0:
        tau = torch.full(batch, float("-inf"), dtype=z.dtype, device=z.device)
        return torch.where(finite, tau, float("nan")), torch.zeros(batch, dtype=torch.long, device=z.device)
    if k == 0:
        tau = torch.full(batch, float("inf"), dtype=z.dtype, device=z.device)
        return torch.where(finite, tau, float("nan")), torch.zeros(batch, dtype=torch.long, device=z.device)
    zf = torch.where(torch.isfinite(z), z, 0.0)
    zs = zf.sort(-1).values.contiguous()
    zm1 = zs - 1
    bps = torch.cat([zm1, zs], -1).sort(-1).values.contiguous()  # [..., 2n]
    zero = zs.new_zeros(batch + (1,))
    cs_z = torch.cat([zero, zs.cumsum(-1)], -1)
    cs_m = torch.cat([zero, zm1.cumsum(-1)], -1)

    def f(t: Tensor) -> Tensor:
        c1, s1 = _gt_stats(zs, cs_z, t)
        c2, s2 = _gt_stats(zm1, cs_m, t)
        return (s1 - t * c1) - (s2 - t * c2)

    fb = f(bps)
    # f is non-increasing along the sorted breakpoints: the ones with f >= k form a prefix.
    p = ((fb >= k - F_SLACK).sum(-1, keepdim=True) - 1).clamp(0, 2 * n - 2)
    b_lo, b_hi, f_lo = bps.gather(-1, p), bps.gather(-1, p + 1), fb.gather(-1, p)
    # |F| on the open interval (b_lo, b_hi): entries with z >= b_hi but z - 1 < b_hi.
    n_frac = torch.searchsorted(zm1, b_hi) - torch.searchsorted(zs, b_hi)
    tau = solve_in_bracket(b_lo, f_lo, n_frac, k, b_hi).squeeze(-1)
    return torch.where(finite, tau, float("nan")), n_frac.squeeze(-1)


def weights(z: Tensor, tau: Tensor) -> Tensor:
    """``clip(z - tau, 0, 1)``, with weight 1 wherever ``tau = -inf`` (all entries kept)."""
    p = (z - tau).clamp(0, 1)
    return torch.where(tau == float("-inf"), torch.ones_like(p), p)


def topk_mask(z: Tensor, k: int, dim: int = -1) -> Tensor:
    """Project ``z`` onto ``{0 <= p <= 1, sum p = k}`` along ``dim``. Same shape and dtype as ``z``,
    contiguous. Computed in float64."""
    zt = z.movedim(dim, -1).to(torch.float64)
    tau, _ = threshold(zt, k)
    p = weights(zt, tau.unsqueeze(-1))
    return p.to(z.dtype).movedim(-1, dim).contiguous()


def topk_mask_backward(p: Tensor, grad: Tensor, dim: int = -1) -> Tensor:
    """Vector-Jacobian product of ``topk_mask``: ``dz = m * (g - sum(m g) / sum(m))``, where
    ``m = (0 < p < 1)`` marks the fractional entries (the only ones that move with ``z``)."""
    frac = (p > 0) & (p < 1)
    g = torch.where(frac, grad, torch.zeros_like(grad)).to(torch.float64)
    count = frac.sum(dim, keepdim=True).clamp_min(1)
    mean = g.sum(dim, keepdim=True) / count
    dz = torch.where(frac, g - mean, torch.zeros_like(g))
    return dz.to(grad.dtype).contiguous()
