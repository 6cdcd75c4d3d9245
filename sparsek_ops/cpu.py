"""PyTorch kernels of SPARSEK attention (backend "torch"): the default on CPU, and usable on
any device. O(S * (topk + window)) memory, vectorised over blocks of queries.

Each block of ``BLOCK_M`` queries gathers its keys once (DESIGN.md section 3, fact 3): the
block's gather list from ``selection.py`` (at most ``topk + BLOCK_M`` selected pairs) and the
``window + BLOCK_M - 1`` consecutive positions its windows span. A dense tile
``[G * BLOCK_M, K]`` per block and KV head, with a per-(query, key) weight ``p`` and mask,
then gives every output at once. The G query heads of a GQA group share the gathered keys.
Blocks are processed in chunks so the workspace stays bounded (``WORKSPACE`` elements per
tile tensor); peak memory is linear in S.

Math (DESIGN.md section 2 and section 3, fact 5), per query i and attended key j::

    s_ij = scale * p_ij * (q_i . k_j),   a = softmax(s),   o_i = sum_j a_ij p_ij v_j
    ds_ij = a_ij (p_ij (do_i . v_j) - delta_i + dlse_i),   delta_i = do_i . o_i
    dq_i = scale sum_j ds_ij p_ij k_j,   dk_j = scale sum_i ds_ij p_ij q_i,   dv_j = sum_i a_ij p_ij do_i
    g_ij = dL/dp_ij = a_ij (do_i . v_j) + scale (q_i . k_j) ds_ij        (summed over the G heads)
    du_l = sum_{i: l in T_i, F_i} g_il - sum_{i: l in F_i} c_i,   c_i = sum_{j in T_i, F_i} g_ij / |F_i|
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .projection import weights
from .selection import Selection, select

BLOCK_M = 64
WORKSPACE = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32; float32 and float64 in their own dtype."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse is float32, except for float64 inputs (float64, so gradcheck sees full precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Plan:
    """Static sizes of one call and the helpers that move tensors between the [B, H, S, D]
    layout and the per-block layout [R, NB, G * BM, D] (R = B * Hkv)."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, topk: int, window: int, block_m: int):
        self.B, self.Hq, self.S, self.D = q.shape
        self.Hkv, self.Dv = k.shape[1], v.shape[-1]
        self.G = self.Hq // self.Hkv
        self.R = self.B * self.Hkv
        self.BM = block_m
        self.NB = -(-self.S // block_m)
        self.window = window
        self.L = min(topk + block_m, self.S) if topk > 0 else 0
        self.Wn = window + block_m - 1 if window > 0 else 0
        self.K = self.L + self.Wn
        per_block = self.R * self.G * self.BM * max(self.K, 1)
        self.chunk = max(1, WORKSPACE // per_block)

    def blocks(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """[B, Hq, S, E] -> [R, NB, G * BM, E], zero-padded to NB * BM queries."""
        x = F.pad(x.to(dtype), (0, 0, 0, self.NB * self.BM - self.S))
        x = x.view(self.B, self.Hkv, self.G, self.NB, self.BM, -1).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(self.R, self.NB, self.G * self.BM, -1)

    def unblocks(self, x: Tensor) -> Tensor:
        """[R, NB, G * BM, E] -> [B, Hq, S, E]."""
        x = x.view(self.B, self.Hkv, self.NB, self.G, self.BM, -1).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(self.B, self.Hq, self.NB * self.BM, -1)[:, :, : self.S]

    def rows(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """[B, Hkv, S, E] -> [R, S + 1, E] with a zero row at index S for padded gathers."""
        x = x.to(dtype).reshape(self.R, self.S, -1)
        return torch.cat([x, x.new_zeros(self.R, 1, x.shape[-1])], 1)

    def chunks(self):
        for b0 in range(0, self.NB, self.chunk):
            yield b0, min(self.NB, b0 + self.chunk)


class _Tile:
    """Keys of the query blocks ``b0 .. b1-1``: positions, weights and masks.

    pos  [R, nc, K]      key positions (gather list, then the window span), S where padding
    p    [R, nc, BM, K]  weight p_ij, 0 where (i, j) is not attended
    ok   [R, nc, BM, K]  attended
    frac [R, nc, BM, L]  selected and fractional (0 < p < 1): the pairs that give u gradient
    """

    def __init__(self, plan: _Plan, sel: Selection, u64: Tensor, b0: int, b1: int, dtype: torch.dtype):
        S, BM, window, dev = plan.S, plan.BM, plan.window, u64.device
        qpos = (torch.arange(b0, b1, device=dev) * BM)[:, None] + torch.arange(BM, device=dev)
        qp = qpos[None, :, :, None]  # [1, nc, BM, 1]
        in_seq = qp < S
        pos_parts, p_parts, ok_parts = [], [], []
        self.frac = None
        if plan.L:
            sp = sel.block_index[:, b0:b1]  # [R, nc, L]
            spc = sp.clamp_min(0)
            flat = spc.flatten(1)
            ev = sel.evict.gather(1, flat).view_as(sp)[:, :, None, :]
            us = u64.gather(1, flat).view_as(sp)[:, :, None, :]
            tau = sel.tau.gather(1, qpos.clamp_max(S - 1).flatten()[None].expand(plan.R, -1))
            tau = tau.view(plan.R, b1 - b0, BM, 1)
            spe = sp[:, :, None, :]
            ok = (spe >= 0) & (spe + window <= qp) & (qp < ev) & in_seq
            p = torch.where(ok, weights(us, tau), 0.0)
            self.frac = ok & (us > tau) & (us < tau + 1)
            pos_parts.append(torch.where(sp >= 0, sp, S))
            p_parts.append(p.to(dtype))
            ok_parts.append(ok)
        if plan.Wn:
            wp = (qpos[:, :1] - window + 1) + torch.arange(plan.Wn, device=dev)  # [nc, Wn]
            wpe = wp[None, :, None, :]
            ok = (wpe >= 0) & (wpe <= qp) & (wpe > qp - window) & in_seq
            pos_parts.append(torch.where((wp >= 0) & (wp < S), wp, S).expand(plan.R, -1, -1))
            p_parts.append(ok.to(dtype).expand(plan.R, -1, -1, -1))
            ok_parts.append(ok.expand(plan.R, -1, -1, -1))
        self.pos = torch.cat(pos_parts, -1)
        self.p = torch.cat(p_parts, -1)
        self.ok = torch.cat(ok_parts, -1)

    def gather(self, rows: Tensor) -> Tensor:
        """Rows [R, S + 1, E] at this tile's key positions: [R, nc, K, E]."""
        R, nc, K = self.pos.shape
        r = torch.arange(R, device=rows.device)[:, None]
        return rows[r, self.pos.view(R, nc * K)].view(R, nc, K, -1)


def _scores(plan: _Plan, tile: _Tile, qb: Tensor, kg: Tensor, scale: float):
    """qk [R, nc, G, BM, K] and the masked logits s = scale * p * qk (-inf where not attended)."""
    R, nc = qb.shape[:2]
    qk = (qb @ kg.transpose(-1, -2)).view(R, nc, plan.G, plan.BM, plan.K)
    s = (scale * tile.p)[:, :, None] * qk
    return qk, s.masked_fill(~tile.ok[:, :, None], float("-inf"))


def forward(q: Tensor, k: Tensor, v: Tensor, u: Tensor, topk: int, window: int, scale: float,
            block_m: int = BLOCK_M) -> tuple[Tensor, Tensor]:
    """out [B, Hq, S, Dv] (dtype of q), lse [B, Hq, S] (``lse_dtype``). Shapes as DESIGN.md section 2."""
    plan = _Plan(q, k, v, topk, window, block_m)
    ct = compute_dtype(q.dtype)
    if plan.S == 0:
        return q.new_empty(plan.B, plan.Hq, 0, plan.Dv), q.new_empty(plan.B, plan.Hq, 0, dtype=lse_dtype(q.dtype))
    sel = select(u, topk, window, block_m)
    u64 = u.detach().reshape(plan.R, plan.S).to(torch.float64)
    qbl = plan.blocks(q, ct)
    krows, vrows = plan.rows(k, ct), plan.rows(v, ct)
    out = qbl.new_empty(plan.R, plan.NB, plan.G * plan.BM, plan.Dv)
    lse = qbl.new_empty(plan.R, plan.NB, plan.G * plan.BM)
    for b0, b1 in plan.chunks():
        tile = _Tile(plan, sel, u64, b0, b1, ct)
        qb = qbl[:, b0:b1]
        _, s = _scores(plan, tile, qb, tile.gather(krows), scale)
        m = s.amax(-1, keepdim=True)
        m = torch.where(m == float("-inf"), 0.0, m)  # padded query rows attend to nothing
        e = torch.exp(s - m)
        den = e.sum(-1, keepdim=True)
        a = e / torch.where(den > 0, den, 1.0)
        ap = (a * tile.p[:, :, None]).view(plan.R, b1 - b0, plan.G * plan.BM, plan.K)
        out[:, b0:b1] = ap @ tile.gather(vrows)
        lse[:, b0:b1] = (m + torch.log(den)).view(plan.R, b1 - b0, -1)
    out = plan.unblocks(out).to(q.dtype).contiguous()
    lse = plan.unblocks(lse[..., None])[..., 0].to(lse_dtype(q.dtype)).contiguous()
    return out, lse


def backward(grad_out: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, u: Tensor,
             out: Tensor, lse: Tensor, topk: int, window: int, scale: float,
             block_m: int = BLOCK_M) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, du, each contiguous in the shape and dtype of its input."""
    plan = _Plan(q, k, v, topk, window, block_m)
    ct = compute_dtype(q.dtype)
    R, S, G, BM, L = plan.R, plan.S, plan.G, plan.BM, plan.L
    if S == 0:
        return (torch.zeros_like(q).contiguous(), torch.zeros_like(k).contiguous(),
                torch.zeros_like(v).contiguous(), torch.zeros_like(u).contiguous())
    sel = select(u, topk, window, block_m)
    u64 = u.detach().reshape(R, S).to(torch.float64)
    qbl, dobl = plan.blocks(q, ct), plan.blocks(grad_out, ct)
    delta = (grad_out.to(ct) * out.to(ct)).sum(-1, keepdim=True)
    deltabl = plan.blocks(delta, ct).view(R, plan.NB, G, BM)
    lsebl = plan.blocks(lse[..., None], ct).view(R, plan.NB, G, BM)
    dlsebl = plan.blocks(grad_lse[..., None], ct).view(R, plan.NB, G, BM) if grad_lse is not None else None
    krows, vrows = plan.rows(k, ct), plan.rows(v, ct)
    dq = torch.empty_like(qbl)
    dk = torch.zeros_like(krows)
    dv = torch.zeros_like(vrows)
    du = torch.zeros(R, S + 1, dtype=torch.float64, device=q.device)
    c = torch.zeros(R, plan.NB * BM, dtype=torch.float64, device=q.device)
    r_idx = torch.arange(R, device=q.device)[:, None]
    n_frac = F.pad(sel.n_frac, (0, plan.NB * BM - S)).clamp_min(1)
    for b0, b1 in plan.chunks():
        nc = b1 - b0
        tile = _Tile(plan, sel, u64, b0, b1, ct)
        qb, dob = qbl[:, b0:b1], dobl[:, b0:b1]
        kg, vg = tile.gather(krows), tile.gather(vrows)
        qk, s = _scores(plan, tile, qb, kg, scale)
        a = torch.exp(s - lsebl[:, b0:b1, ..., None])
        p = tile.p[:, :, None]
        dov = (dob @ vg.transpose(-1, -2)).view_as(qk)
        shift = -deltabl[:, b0:b1]
        if dlsebl is not None:
            shift = shift + dlsebl[:, b0:b1]
        ds = a * (p * dov + shift[..., None])
        w = (ds * p * scale).view(R, nc, G * BM, plan.K)
        dq[:, b0:b1] = w @ kg
        flat = tile.pos.view(R, -1)
        dk.index_put_((r_idx, flat), (w.transpose(-1, -2) @ qb).view(R, -1, plan.D), accumulate=True)
        ap = (a * p).view(R, nc, G * BM, plan.K)
        dv.index_put_((r_idx, flat), (ap.transpose(-1, -2) @ dob).view(R, -1, plan.Dv), accumulate=True)
        if L:
            g = (a * dov + scale * qk * ds)[..., :L].sum(2)  # [R, nc, BM, L], GQA heads summed
            g = torch.where(tile.frac, g, 0.0).to(torch.float64)
            du.index_put_((r_idx, tile.pos[..., :L].reshape(R, -1)), g.sum(2).view(R, -1), accumulate=True)
            c[:, b0 * BM: b1 * BM] = (g.sum(-1) / n_frac[:, b0 * BM: b1 * BM].view(R, nc, BM)).view(R, -1)
    du = du[:, :S]
    if L:
        du = du - _fractional_share(sel, u64, c[:, :S], window)
    dq = plan.unblocks(dq).to(q.dtype).contiguous()
    dk = dk[:, :S].reshape(k.shape).to(k.dtype).contiguous()
    dv = dv[:, :S].reshape(v.shape).to(v.dtype).contiguous()
    return dq, dk, dv, du.reshape(u.shape).to(u.dtype).contiguous()


def _fractional_share(sel: Selection, u64: Tensor, c: Tensor, window: int) -> Tensor:
    """``sum_{i : l in F_i} c_i`` for every pair l, [R, S] float64.

    ``l in F_i`` iff ``i >= l + window`` and ``tau_i < u_l < tau_i + 1`` (the test of
    ``selection.prefix_fractional_counts``). tau is non-decreasing
    in i (fact 1), so these queries form one contiguous range found by binary search, and the
    sum is a difference of prefix sums of c (fact 5). Poisoned (NaN) queries form a suffix and
    are searched as +inf.
    """
    R, S = c.shape
    tau = torch.nan_to_num(sel.tau, nan=math.inf).contiguous()
    ul = torch.where(torch.isfinite(u64), u64, 0.0).contiguous()
    lo = torch.searchsorted(tau + 1, ul, right=True)  # first i with tau_i + 1 > u_l
    lo = torch.maximum(lo, torch.arange(S, device=c.device) + window).clamp_max(S)
    hi = torch.searchsorted(tau, ul, right=False)  # first i with tau_i >= u_l
    cs = torch.cat([c.new_zeros(R, 1), c.cumsum(1)], 1)
    return torch.where(hi > lo, cs.gather(1, hi) - cs.gather(1, torch.minimum(lo, hi)), 0.0)
