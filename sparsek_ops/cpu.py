"""PyTorch kernels of SPARSEK attention (backend "torch"): the default on CPU, and usable on
any device. O(S * (topk + window)) memory, vectorised over blocks of queries.

Each block of ``BLOCK_M`` queries gathers its keys once (DESIGN.md section 3, fact 3): the
block's gather list from ``selection.py`` (at most ``topk + BLOCK_M`` selected pairs) and the
``window + BLOCK_M - 1`` consecutive positions its windows span. Two dense tiles per block
and KV head, ``[G * BLOCK_M, L]`` for the selected pairs (weight ``p`` and a mask per
(query, key)) and ``[G * BLOCK_M, Wn]`` for the span (a fixed band mask), share one softmax.
The G query heads of a GQA group share the gathered keys.

Layout: the blocks of all rows (R = batch * kv_heads) are numbered ``f = r * NBp + b``. Each
row is padded with a few dummy blocks so that the span of block f starts at ``f * BLOCK_M``
in one flat, padded copy of the keys: the spans of any range of blocks are then a strided
*view* (no copy) that batched matmul reads directly. Blocks are processed in chunks whose
tiles stay in cache (``WORKSPACE`` elements per tile tensor); peak memory is linear in S.

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
WORKSPACE = 1 << 20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32; float32 and float64 in their own dtype."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse is float32, except for float64 inputs (float64, so gradcheck sees full precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Plan:
    """Sizes of one call and the moves between the [B, H, S, E] layout and the block layout
    ``[R * NBp, G * BM, E]`` (block f = r * NBp + b holds queries b*BM .. b*BM+BM-1 of row r)."""

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
        # Dummy blocks at the end of each row give the span buffer room for the left padding.
        self.NBp = self.NB + (-(-(window - 1) // block_m) if window > 1 else 0)
        self.F = self.R * self.NBp
        per_block = self.G * self.BM * max(self.L + self.Wn, 1)
        self.chunk = max(1, WORKSPACE // per_block)
        self.device = q.device

    def blocks(self, x: Tensor, dtype: torch.dtype, fill: float = 0.0) -> Tensor:
        """[B, Hq, S, E] -> [F, G * BM, E]; padded queries and dummy blocks hold ``fill``."""
        x = F.pad(x.to(dtype), (0, 0, 0, self.NBp * self.BM - self.S), value=fill)
        x = x.view(self.B, self.Hkv, self.G, self.NBp, self.BM, -1).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(self.F, self.G * self.BM, -1)

    def unblocks(self, x: Tensor) -> Tensor:
        """[F, G * BM, E] -> [B, Hq, S, E]."""
        x = x.view(self.B, self.Hkv, self.NBp, self.G, self.BM, -1)[:, :, : self.NB]
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(self.B, self.Hq, self.NB * self.BM, -1)
        return x[:, :, : self.S]

    def rows(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """[B, Hkv, S, E] -> [R * (S + 1), E]: row r, position j at r * (S + 1) + j, and a zero
        row at j = S that padded gathers read."""
        x = x.to(dtype).reshape(self.R, self.S, -1)
        return torch.cat([x, x.new_zeros(self.R, 1, x.shape[-1])], 1).view(self.R * (self.S + 1), -1)

    def span_buffer(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """[B, Hkv, S, E] -> flat [F * BM + Wn, E]: row r's positions j at r * NBp * BM + window - 1 + j,
        zeros around them."""
        x = x.to(dtype).reshape(self.R, self.S, -1)
        x = F.pad(x, (0, 0, self.window - 1, self.NBp * self.BM - self.S - self.window + 1))
        return F.pad(x.reshape(self.F * self.BM, -1), (0, 0, 0, self.Wn))

    def spans(self, buf: Tensor, f0: int, f1: int) -> Tensor:
        """Spans of blocks f0 .. f1-1 as a view of ``buf``: [f1 - f0, Wn, E]. Block b of a row spans
        positions ``b*BM - window + 1 .. b*BM + BM - 1``."""
        E = buf.shape[-1]
        return buf[f0 * self.BM:].as_strided((f1 - f0, self.Wn, E), (self.BM * E, E, 1))

    def unspan(self, buf: Tensor, x: Tensor) -> Tensor:
        """Adjoint of ``span_buffer``: flat [F * BM + Wn, E] -> [B, Hkv, S, E]."""
        x = buf[: self.F * self.BM].view(self.R, self.NBp * self.BM, -1)
        return x[:, self.window - 1: self.window - 1 + self.S].reshape(self.B, self.Hkv, self.S, -1)

    def band_bias(self, dtype: torch.dtype) -> Tensor:
        """[G * BM, Wn]: 0 where query t of a block may see span key c (``t <= c <= t + window - 1``),
        -inf elsewhere. The same for every block and every head of a group."""
        t = torch.arange(self.BM, device=self.device)[:, None]
        c = torch.arange(self.Wn, device=self.device)
        ok = (c >= t) & (c <= t + self.window - 1)
        bias = torch.zeros(ok.shape, dtype=dtype, device=self.device).masked_fill_(~ok, float("-inf"))
        return bias.repeat(self.G, 1)

    def query_pos(self, f0: int, f1: int) -> Tensor:
        """[nc, BM] query positions of blocks f0 .. f1-1 (>= S for padding)."""
        b = torch.arange(f0, f1, device=self.device) % self.NBp
        return (b * self.BM)[:, None] + torch.arange(self.BM, device=self.device)

    def row_of(self, f0: int, f1: int) -> Tensor:
        """[nc] the row r of each block."""
        return torch.div(torch.arange(f0, f1, device=self.device), self.NBp, rounding_mode="floor")

    def chunks(self):
        for f0 in range(0, self.F, self.chunk):
            yield f0, min(self.F, f0 + self.chunk)


class _Selected:
    """The selected pairs gathered by blocks f0 .. f1-1 (nc = f1 - f0 blocks).

    idx  [nc * L]        rows of the gathered pairs in ``_Plan.rows`` (the zero row for padding)
    p    [nc, 1, BM, L]  weights clip(u_j - tau_i, 0, 1) (not masked: masked entries get a = 0)
    bad  [nc, 1, BM, L]  True where query i does not select slot j
    k, v [nc, L, E]      gathered keys and values
    """

    def __init__(self, plan: _Plan, x: "_Inputs", f0: int, f1: int):
        S, BM, nc, sel = plan.S, plan.BM, f1 - f0, x.sel
        qpos = plan.query_pos(f0, f1)
        r = plan.row_of(f0, f1)[:, None]
        sp = x.lists[f0:f1]  # [nc, L], -1 for padding
        pad = sp < 0
        flat = r * S + sp.clamp(0, S - 1)  # index into [R * S] tensors
        self.idx = (r * (S + 1) + torch.where(pad, S, sp)).view(-1)
        start = torch.where(pad, S + plan.window + 1, sp + plan.window)[:, None, None, :]
        stop = sel.evict.view(-1)[flat][:, None, None, :]
        qp = qpos[:, None, :, None]
        self.bad = (qp < start) | (qp >= stop)
        self.u64 = x.u64.view(-1)[flat][:, None, None, :]  # [nc, 1, 1, L]
        self.tau64 = sel.tau.view(-1)[r * S + qpos.clamp_max(S - 1)][:, None, :, None]  # [nc, 1, BM, 1]
        # Weights in the compute dtype, but from scores shifted by the block's first tau, so that
        # large scores keep their precision near the threshold. tau = -inf (every candidate kept)
        # gives u - tau = inf, so weight 1, as it should.
        shift = torch.nan_to_num(self.tau64[:, :, :1], neginf=0.0)
        ct = x.ct
        self.p = ((self.u64 - shift).to(ct) - (self.tau64 - shift).to(ct)).clamp_(0, 1)
        self.k = x.krows.index_select(0, self.idx).view(nc, -1, x.krows.shape[-1])
        self.v = x.vrows.index_select(0, self.idx).view(nc, -1, x.vrows.shape[-1])

    def fractional(self) -> Tensor:
        """[nc, 1, BM, L]: selected and ``tau < u < tau + 1``, in float64: the very test of
        ``selection.prefix_fractional_counts``, so |F| and the pairs in F always agree."""
        return ~self.bad & (self.u64 > self.tau64) & (self.u64 < self.tau64 + 1)


class _Logits:
    """Masked logits of one chunk: ``s = (scale q) . k * p`` on the selected pairs [nc, G, BM, L]
    and ``(scale q) . k + band`` on the span [nc, G * BM, Wn]."""

    def __init__(self, plan: _Plan, qs: Tensor, part: _Selected | None, kw: Tensor | None,
                 band: Tensor | None, f0: int, f1: int):
        nc = f1 - f0
        self.qk = self.s_sel = self.s_win = None
        if part is not None:
            self.qk = torch.matmul(qs, part.k.transpose(-1, -2)).view(nc, plan.G, plan.BM, -1)
            self.s_sel = (self.qk * part.p).masked_fill_(part.bad, float("-inf"))
        if kw is not None:
            self.s_win = torch.baddbmm(band, qs, kw.transpose(-1, -2))
            kpos = (plan.query_pos(f0, f1)[:, :1] - plan.window + 1) + torch.arange(plan.Wn, device=qs.device)
            before = kpos < 0  # span keys before position 0 (first blocks of each row only)
            self.s_win.masked_fill_(before[:, None, :], float("-inf"))

    def rowmax(self) -> Tensor:
        """[nc, G*BM, 1], the max over both parts, 0 for rows that see nothing."""
        parts = []
        if self.s_sel is not None:
            parts.append(self.s_sel.amax(-1).flatten(1))
        if self.s_win is not None:
            parts.append(self.s_win.amax(-1))
        m = parts[0] if len(parts) == 1 else torch.maximum(*parts)
        return torch.where(m == float("-inf"), 0.0, m)[..., None]

    def exp_(self, shift: Tensor) -> None:
        """In place: s <- exp(s - shift), shift [nc, G*BM, 1]."""
        if self.s_sel is not None:
            self.s_sel.sub_(shift.view(self.s_sel.shape[:-1] + (1,))).exp_()
        if self.s_win is not None:
            self.s_win.sub_(shift).exp_()


class _Inputs:
    """Everything a chunk reads, prepared once per call."""

    def __init__(self, plan: _Plan, q: Tensor, k: Tensor, v: Tensor, u: Tensor, topk: int, scale: float):
        ct = compute_dtype(q.dtype)
        self.ct = ct
        self.sel = self.lists = None
        if plan.L:
            self.sel = select(u, topk, plan.window, plan.BM)
            lists = F.pad(self.sel.block_index, (0, 0, 0, plan.NBp - plan.NB), value=-1)
            self.lists = lists.reshape(plan.F, plan.L)
        self.u64 = u.detach().reshape(plan.R, plan.S).to(torch.float64).contiguous()
        self.qs = plan.blocks(q, ct) * scale
        self.krows, self.vrows = plan.rows(k, ct), plan.rows(v, ct)
        if plan.Wn:
            self.kbuf, self.vbuf = plan.span_buffer(k, ct), plan.span_buffer(v, ct)
            self.band = plan.band_bias(ct)

    def chunk(self, plan: _Plan, f0: int, f1: int):
        part = None
        if plan.L:
            part = _Selected(plan, self, f0, f1)
        kw = plan.spans(self.kbuf, f0, f1) if plan.Wn else None
        lg = _Logits(plan, self.qs[f0:f1], part, kw, self.band if plan.Wn else None, f0, f1)
        return part, kw, lg


@torch.no_grad()
def forward(q: Tensor, k: Tensor, v: Tensor, u: Tensor, topk: int, window: int, scale: float,
            block_m: int = BLOCK_M) -> tuple[Tensor, Tensor]:
    """out [B, Hq, S, Dv] (dtype of q), lse [B, Hq, S] (``lse_dtype``). Shapes as DESIGN.md section 2."""
    plan = _Plan(q, k, v, topk, window, block_m)
    if plan.S == 0:
        return q.new_empty(plan.B, plan.Hq, 0, plan.Dv), q.new_empty(plan.B, plan.Hq, 0, dtype=lse_dtype(q.dtype))
    x = _Inputs(plan, q, k, v, u, topk, scale)
    out = x.qs.new_empty(plan.F, plan.G * plan.BM, plan.Dv)
    lse = x.qs.new_empty(plan.F, plan.G * plan.BM, 1)
    for f0, f1 in plan.chunks():
        part, _, lg = x.chunk(plan, f0, f1)
        m = lg.rowmax()
        lg.exp_(m)
        den, o = 0, None
        if part is not None:
            den = lg.s_sel.sum(-1).flatten(1)[..., None]
            o = torch.matmul(lg.s_sel.mul_(part.p).view(f1 - f0, plan.G * plan.BM, -1), part.v)
        if plan.Wn:
            den = den + lg.s_win.sum(-1, keepdim=True)
            vw = plan.spans(x.vbuf, f0, f1)
            o = torch.matmul(lg.s_win, vw) if o is None else o.baddbmm_(lg.s_win, vw)
        torch.div(o, den, out=out[f0:f1])
        torch.add(m, torch.log(den), out=lse[f0:f1])
    out = plan.unblocks(out).to(q.dtype).contiguous()
    lse = plan.unblocks(lse)[..., 0].to(lse_dtype(q.dtype)).contiguous()
    return out, lse


@torch.no_grad()
def backward(grad_out: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, u: Tensor,
             out: Tensor, lse: Tensor, topk: int, window: int, scale: float,
             block_m: int = BLOCK_M) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, du, each contiguous in the shape and dtype of its input."""
    plan = _Plan(q, k, v, topk, window, block_m)
    R, S, G, BM, L = plan.R, plan.S, plan.G, plan.BM, plan.L
    if S == 0:
        return (torch.zeros_like(q).contiguous(), torch.zeros_like(k).contiguous(),
                torch.zeros_like(v).contiguous(), torch.zeros_like(u).contiguous())
    x = _Inputs(plan, q, k, v, u, topk, scale)
    ct = x.ct
    dob = plan.blocks(grad_out, ct)
    # Per query row: dlse - delta (delta = do . o), and lse; padded rows get lse = +inf, so that
    # they attend to nothing here.
    shift = -(grad_out.to(ct) * out.to(ct)).sum(-1, keepdim=True)
    if grad_lse is not None:
        shift = shift + grad_lse.to(ct)[..., None]
    shift = plan.blocks(shift, ct)
    lseb = plan.blocks(lse[..., None], ct, fill=float("inf"))
    dq = torch.empty_like(x.qs)
    dk, dv = torch.zeros_like(x.krows), torch.zeros_like(x.vrows)
    if plan.Wn:
        dkbuf, dvbuf = torch.zeros_like(x.kbuf), torch.zeros_like(x.vbuf)
    du = torch.zeros(R * S, dtype=torch.float64, device=q.device)
    c = torch.zeros(plan.F, BM, dtype=torch.float64, device=q.device)
    n_frac = F.pad(x.sel.n_frac.view(R, S).clamp_min(1), (0, plan.NBp * BM - S), value=1).view(plan.F, BM) if L else None
    for f0, f1 in plan.chunks():
        nc = f1 - f0
        part, kw, lg = x.chunk(plan, f0, f1)
        qs, do, sh = x.qs[f0:f1], dob[f0:f1], shift[f0:f1]
        lg.exp_(lseb[f0:f1])  # s -> a, the softmax weights
        dqc = None
        if part is not None:
            a = lg.s_sel
            dov = torch.matmul(do, part.v.transpose(-1, -2)).view_as(a)
            ds = (dov * part.p).add_(sh.view(nc, G, BM, 1)).mul_(a)  # dL/ds
            dsp = (ds * part.p).view(nc, G * BM, -1)
            dqc = torch.matmul(dsp, part.k)
            dk.index_add_(0, part.idx, torch.matmul(dsp.transpose(-1, -2), qs).view(-1, plan.D))
            ap = (a * part.p).view(nc, G * BM, -1)
            dv.index_add_(0, part.idx, torch.matmul(ap.transpose(-1, -2), do).view(-1, plan.Dv))
            g = a.mul_(dov).addcmul_(lg.qk, ds).sum(1, keepdim=True)  # dL/dp, GQA heads summed
            g = torch.where(part.fractional(), g, 0.0).to(torch.float64)[:, 0]  # [nc, BM, L]
            r = plan.row_of(f0, f1)[:, None]
            pos = torch.div(part.idx.view(nc, -1), S + 1, rounding_mode="floor")  # == r
            du_idx = (part.idx.view(nc, -1) - pos * (S + 1)).clamp_max(S - 1) + r * S
            du.index_add_(0, du_idx.view(-1), g.sum(1).view(-1))
            c[f0:f1] = g.sum(-1) / n_frac[f0:f1]
        if plan.Wn:
            a = lg.s_win
            vw = plan.spans(x.vbuf, f0, f1)
            dsw = torch.matmul(do, vw.transpose(-1, -2)).add_(sh).mul_(a)
            dqc = torch.matmul(dsw, kw) if dqc is None else dqc.baddbmm_(dsw, kw)
            rows = ((torch.arange(f0, f1, device=q.device) * BM)[:, None] + torch.arange(plan.Wn, device=q.device)).view(-1)
            dkbuf.index_add_(0, rows, torch.matmul(dsw.transpose(-1, -2), qs).view(-1, plan.D))
            dvbuf.index_add_(0, rows, torch.matmul(a.transpose(-1, -2), do).view(-1, plan.Dv))
        torch.mul(dqc, scale, out=dq[f0:f1])
    dk = dk.view(R, S + 1, -1)[:, :S].reshape(k.shape)
    dv = dv.view(R, S + 1, -1)[:, :S].reshape(v.shape)
    if plan.Wn:
        dk = dk + plan.unspan(dkbuf, k)
        dv = dv + plan.unspan(dvbuf, v)
    du = du.view(R, S)
    if L:
        cq = c.view(R, plan.NBp * BM)[:, :S]
        du = du - _fractional_share(x.sel, x.u64, cq, window)
    dq = plan.unblocks(dq).to(q.dtype).contiguous()
    return (dq, dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(),
            du.reshape(u.shape).to(u.dtype).contiguous())


def _fractional_share(sel: Selection, u64: Tensor, c: Tensor, window: int) -> Tensor:
    """``sum_{i : l in F_i} c_i`` for every pair l, [R, S] float64.

    ``l in F_i`` iff ``i >= l + window`` and ``tau_i < u_l < tau_i + 1`` (the test of
    ``selection.prefix_fractional_counts``). tau is non-decreasing in i (fact 1), so these
    queries form one contiguous range found by binary search, and the sum is a difference of
    prefix sums of c (fact 5). Poisoned (NaN) queries form a suffix and are searched as +inf.
    """
    R, S = c.shape
    tau = torch.nan_to_num(sel.tau, nan=math.inf).contiguous()
    ul = torch.where(torch.isfinite(u64), u64, 0.0).contiguous()
    lo = torch.searchsorted(tau + 1, ul, right=True)  # first i with tau_i + 1 > u_l
    lo = torch.maximum(lo, torch.arange(S, device=c.device) + window).clamp_max(S)
    hi = torch.searchsorted(tau, ul, right=False)  # first i with tau_i >= u_l
    cs = torch.cat([c.new_zeros(R, 1), c.cumsum(1)], 1)
    return torch.where(hi > lo, cs.gather(1, hi) - cs.gather(1, torch.minimum(lo, hi)), 0.0)
