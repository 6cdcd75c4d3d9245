"""PyTorch kernels of SPARSEK attention (backend "torch"): the default on CPU, and usable on
any device. O(S * (topk + window)) memory, vectorised over blocks of queries.

Each block of ``BLOCK_M`` queries gathers its keys once (DESIGN.md section 3, fact 3): the
block's gather list from ``selection.py`` (at most ``topk + BLOCK_M`` selected pairs) and the
``window + BLOCK_M - 1`` consecutive positions its windows span. Two dense tiles per block
and KV head, ``[G * BLOCK_M, L]`` for the selected pairs (weight ``p`` and a mask per
(query, key)) and ``[G * BLOCK_M, Wn]`` for the span (a fixed band mask), are two parts of
one softmax, merged through their log-sum-exps. The G query heads of a GQA group share the
gathered keys.

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

import torch
import torch.nn.functional as F
from torch import Tensor

from .selection import fractional_ranges, select

BLOCK_M = 64
SEL_BLOCKS = 2  # the selected part works on blocks of SEL_BLOCKS * BLOCK_M queries (see _Plan)
WORKSPACE = 1 << 21
FUSED = True  # forward through ATen's fused CPU attention where it exists (cpu_fused.py)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32; float32 and float64 in their own dtype."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse is float32, except for float64 inputs (float64, so gradcheck sees full precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Plan:
    """Sizes of one call and the moves between the [B, H, S, E] layout and the block layout
    ``[R * NBp, G * BM, E]`` (block f = r * NBp + b holds queries b*BM .. b*BM+BM-1 of row r).

    Keys and values live in one flat, zero-padded buffer per call (``buffer``): row r's position
    j sits at ``r * P + left + j`` (``P = NBp * BM``, ``left = window - 1``), so that the window
    span of block f starts exactly at ``f * BM``, and the last row of the buffer is a zero row
    that padding slots gather."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, topk: int, window: int, block_m: int,
                 sel_blocks: int):
        self.B, self.Hq, self.S, self.D = q.shape
        self.Hkv, self.Dv = k.shape[1], v.shape[-1]
        self.G = self.Hq // self.Hkv
        self.R = self.B * self.Hkv
        self.BM = block_m
        self.NB = -(-self.S // block_m)
        self.window = window
        self.left = max(window - 1, 0)
        # The selected pairs change slowly, so their gather lists are built for larger blocks of
        # BS = m * BM queries (fewer gathers, larger matmuls); the window keeps BM (its span wastes
        # BM - 1 keys per query).
        self.m = sel_blocks
        self.BS = self.m * block_m
        self.NBs = -(-self.S // self.BS)
        self.L = min(topk + self.BS, self.S) if topk > 0 else 0
        self.Wn = window + block_m - 1 if window > 0 else 0
        # Dummy blocks at the end of each row: room for the last selected block and for the
        # left padding of the buffer; a multiple of m per row, so that the selected blocks of a
        # chunk of whole rows line up with its blocks.
        self.NBp = self.NBs * self.m + -(-self.left // self.BS) * self.m
        self.NBsp = self.NBp // self.m  # selected blocks per row, dummies included
        self.P = self.NBp * block_m
        self.F = self.R * self.NBp
        self.zero_row = self.F * block_m + self.Wn
        per_block = self.G * self.BM * max(self.L + self.Wn, 1)
        self.chunk = max(1, WORKSPACE // per_block // self.m) * self.m
        self.device = q.device

    def blocks(self, x: Tensor, dtype: torch.dtype, fill: float = 0.0, scale: float | None = None) -> Tensor:
        """[B, Hq, S, E] -> [F, G * BM, E] in one copy (times ``scale`` if given). Padding queries
        and dummy blocks hold ``fill``."""
        B, Hkv, G, NB, BM, S = self.B, self.Hkv, self.G, self.NB, self.BM, self.S
        E = x.shape[-1]
        out = torch.empty((self.F, G * BM, E), dtype=dtype, device=x.device)
        dst = out.view(B, Hkv, self.NBp, G, BM, E)
        src = x.view(B, Hkv, G, S, E)
        full = S // BM
        parts = [(dst[:, :, :full], src[:, :, :, : full * BM].reshape(B, Hkv, G, full, BM, E).transpose(2, 3))]
        tail = S - full * BM
        if tail:
            parts.append((dst[:, :, full, :, :tail], src[:, :, :, full * BM:]))
            dst[:, :, full, :, tail:] = fill
        dst[:, :, NB:] = fill  # dummy blocks: read as padding of the last selected block
        for d, sv in parts:
            if scale is None:
                d.copy_(sv)
            else:
                torch.mul(sv, scale, out=d)
        return out

    def put(self, dst: Tensor, f0: int, f1: int, val: Tensor) -> None:
        """Write the blocks f0 .. f1-1 (``val [nc, G * BM, E]``: a range of one row, or whole
        rows) into ``dst [B, Hq, S, E]``; dummy blocks and padding queries are dropped."""
        r, b0 = divmod(f0, self.NBp)
        nc, G, BM = f1 - f0, self.G, self.BM
        if b0 + nc > self.NBp:  # whole rows r .. r1-1
            r1 = f1 // self.NBp
            val = val.view(r1 - r, self.NBp, G, BM, -1)[:, : self.NB].transpose(1, 2)
            dst.view(self.R, G, self.S, -1)[r:r1] = val.reshape(r1 - r, G, self.NB * BM, -1)[:, :, : self.S]
            return
        n = min(self.S - b0 * BM, nc * BM)
        val = val.view(nc, G, BM, -1).transpose(0, 1).reshape(G, nc * BM, -1)[:, :n]
        dst.view(self.R, G, self.S, -1)[r, :, b0 * BM: b0 * BM + n] = val

    def to_sel(self, x: Tensor, f0: int, f1: int) -> Tensor:
        """Blocks f0 .. f1-1 ([F, G * BM, E] layout, f0 at a multiple of m) regrouped into the
        selected blocks that cover them: [ceil((f1 - f0) / m), G * BS, E] (a copy)."""
        ns = -(-(f1 - f0) // self.m)
        x = x[f0: f0 + ns * self.m].view(ns, self.m, self.G, self.BM, -1).transpose(1, 2)
        return x.reshape(ns, self.G * self.BS, -1)

    def from_sel(self, y: Tensor, nc: int) -> Tensor:
        """Inverse of ``to_sel``: [ns, G * BS, E] -> [nc, G * BM, E]."""
        ns = y.shape[0]
        y = y.view(ns, self.G, self.m, self.BM, -1).transpose(1, 2)
        return y.reshape(ns * self.m, self.G * self.BM, -1)[:nc]

    def buffer(self, x: Tensor, dtype: torch.dtype, width: int | None = None) -> Tensor:
        """[B, Hkv, S, E] -> the flat buffer [F * BM + Wn + 1, width] (zeros around the data,
        columns past E zero too)."""
        E = x.shape[-1]
        width = width or E
        buf = torch.empty((self.zero_row + 1, width), dtype=dtype, device=x.device)
        rows = buf[: self.F * self.BM].view(self.R, self.P, width)
        rows[:, : self.left] = 0
        rows[:, self.left + self.S:] = 0
        rows[:, self.left: self.left + self.S, :E] = x.reshape(self.R, self.S, E)
        if width > E:
            rows[:, self.left: self.left + self.S, E:] = 0
        buf[self.F * self.BM:] = 0
        return buf

    def index(self, r: Tensor, j: Tensor) -> Tensor:
        """Buffer rows of positions j (< 0: padding, read as the zero row) of rows r."""
        return torch.where(j >= 0, r * self.P + self.left + j, self.zero_row)

    def spans(self, buf: Tensor, f0: int, f1: int) -> Tensor:
        """Spans of blocks f0 .. f1-1 as a view of ``buf``: [f1 - f0, Wn, E]. Block b of a row spans
        positions ``b*BM - window + 1 .. b*BM + BM - 1``."""
        E = buf.shape[-1]
        return buf[f0 * self.BM:].as_strided((f1 - f0, self.Wn, E), (self.BM * E, E, 1))

    def unbuffer(self, buf: Tensor) -> Tensor:
        """Adjoint of ``buffer``: [F * BM + Wn + 1, E] -> [B, Hkv, S, E]."""
        x = buf[: self.F * self.BM].view(self.R, self.P, -1)
        return x[:, self.left: self.left + self.S].reshape(self.B, self.Hkv, self.S, -1)

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

    def keys_before_start(self, f0: int, f1: int) -> Tensor | None:
        """[nc, Wn]: span keys of blocks f0 .. f1-1 that lie before position 0 (only the first
        blocks of a row have any), or None when there are none."""
        kpos = (self.query_pos(f0, f1)[:, :1] - self.window + 1) + torch.arange(self.Wn, device=self.device)
        before = kpos < 0
        return before if bool(before[:, 0].any()) else None

    def chunks(self):
        """Block ranges [f0, f1): whole rows (dummy blocks included) when two or more fit in a
        chunk, so that short sequences cost a few large calls rather than a few small calls per
        row; else ranges of the real blocks of one row."""
        rows = self.chunk // self.NBp
        if rows >= 2:
            for r in range(0, self.R, rows):
                yield r * self.NBp, min(self.R, r + rows) * self.NBp
            return
        for r in range(self.R):
            for b0 in range(0, self.NB, self.chunk):
                yield r * self.NBp + b0, r * self.NBp + min(self.NB, b0 + self.chunk)


class _Selected:
    """The selected pairs gathered by the selected blocks (of BS queries) that cover window
    blocks f0 .. f1-1 of one row: nc = ceil((f1 - f0) / m) blocks; L = the widest gather list
    among them (lists are compact, so the rest is padding in every block).

    qpos [nc, BS]        query positions (>= S for padding)
    idx  [nc * L]        buffer rows of the gathered pairs (the zero row for padding)
    flat [nc, L]         their index in [R * S] tensors (clamped for padding)
    p    [nc, 1, BS, L]  weights clip(u_j - tau_i, 0, 1) (not masked: masked entries get a = 0)
    bad  [nc, 1, BS, L]  True where query i does not select slot j
    k, v [nc, L, E]      gathered keys and values
    """

    def __init__(self, plan: _Plan, x: "_Inputs", f0: int, f1: int):
        S, BS, sel = plan.S, plan.BS, x.sel
        g0 = f0 // plan.m  # first selected block (f0 is a multiple of m)
        nc = -(-(f1 - f0) // plan.m)
        g = torch.arange(g0, g0 + nc, device=plan.device)
        self.g0 = g0
        sp = x.lists[g0: g0 + nc]
        self.width = int((sp >= 0).sum(1).max()) if sp.numel() else 0
        sp = sp[:, : self.width]  # [nc, L], -1 for padding
        qpos = ((g % plan.NBsp) * BS)[:, None] + torch.arange(BS, device=plan.device)
        self.qpos = qpos
        r = (g // plan.NBsp)[:, None]
        pad = sp < 0
        flat = r * S + sp.clamp(0, S - 1)  # index into [R * S] tensors
        self.flat = flat
        self.idx = plan.index(r, sp).view(-1)
        start = torch.where(pad, S + plan.window + 1, sp + plan.window)[:, None, None, :]
        stop = sel.evict.view(-1)[flat][:, None, None, :]
        qp = qpos[:, None, :, None]
        self.bad = (qp < start) | (qp >= stop)
        self.u64 = x.u64.view(-1)[flat][:, None, None, :]  # [nc, 1, 1, L]
        self.tau64 = sel.tau.view(-1)[r * S + qpos.clamp_max(S - 1)][:, None, :, None]  # [nc, 1, BS, 1]
        # Weights in the compute dtype, but from scores shifted by the block's first tau, so that
        # large scores keep their precision near the threshold. tau = -inf (every candidate kept)
        # gives u - tau = inf, so weight 1, as it should.
        shift = torch.nan_to_num(self.tau64[:, :, :1], nan=0.0, neginf=0.0)
        ct = x.ct
        p = ((self.u64 - shift).to(ct) - (self.tau64 - shift).to(ct)).clamp_(0, 1)
        # 0 where not selected: a NaN score gathered for the block must poison only the queries
        # that select it (the bias makes those logits -inf, but -inf + qk * NaN would be NaN)
        self.p = p.masked_fill_(self.bad, 0.0)
        self.k = x.kbuf.index_select(0, self.idx).view(nc, -1, x.kbuf.shape[-1])[..., : plan.D]
        self.v = x.vbuf.index_select(0, self.idx).view(nc, -1, x.vbuf.shape[-1])[..., : plan.Dv]

    def logits(self, qs: Tensor, G: int) -> tuple[Tensor, Tensor]:
        """qk [nc, G, BS, L] (q already scaled, ``_Plan.to_sel`` layout) and the masked logits
        ``s = qk * p`` (-inf where not selected), in one pass."""
        nc, BM = qs.shape[0], self.p.shape[2]
        qk = torch.matmul(qs, self.k.transpose(-1, -2)).view(nc, G, BM, -1)
        bias = torch.where(self.bad, float("-inf"), 0.0).to(self.p.dtype)
        return qk, torch.addcmul(bias, qk, self.p)

    def fractional(self) -> Tensor:
        """[nc, 1, BS, L]: selected and ``tau < u < tau + 1``, in float64: the very test of
        ``selection.prefix_fractional_counts``, so |F| and the pairs in F always agree."""
        return ~self.bad & (self.u64 > self.tau64) & (self.u64 < self.tau64 + 1)


def _window_logits(plan: _Plan, x: "_Inputs", qs: Tensor, f0: int, f1: int) -> Tensor:
    """Masked logits of the window spans of blocks f0 .. f1-1: [nc, G * BM, Wn]."""
    kw = plan.spans(x.kbuf, f0, f1)[..., : plan.D]
    s = torch.baddbmm(x.band, qs, kw.transpose(-1, -2))
    before = plan.keys_before_start(f0, f1)
    return s if before is None else s.masked_fill_(before[:, None, :], float("-inf"))


def _softmax_part(s: Tensor, v: Tensor, p: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Normalised output and lse of one part: s [nc, rows, K] logits (consumed), v [nc, K, E],
    p an optional multiplier of the attention weights (broadcastable to s).
    Returns (o [nc, rows, E], lse [nc, rows]); rows that see nothing get o = 0, lse = -inf."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)
    e = s.sub_(m).exp_()
    den = e.sum(-1, keepdim=True)
    if p is not None:
        e = e.mul_(p)
    o = torch.matmul(e.view(v.shape[0], -1, v.shape[1]), v).view(*s.shape[:-1], -1)
    return o / torch.where(den > 0, den, 1.0), (m + torch.log(den))[..., 0]


def _merge(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Combine the (o, lse) of disjoint key sets of the same queries into one softmax."""
    if len(parts) == 1:
        return parts[0]
    (o1, l1), (o2, l2) = parts
    m = torch.logaddexp(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    return o1 * w1[..., None] + o2 * w2[..., None], m


class _Inputs:
    """Everything a chunk reads, prepared once per call."""

    def __init__(self, plan: _Plan, q: Tensor, k: Tensor, v: Tensor, u: Tensor, topk: int, scale: float,
                 fused: bool = False, backward: bool = False):
        ct = compute_dtype(q.dtype)
        self.ct = ct
        self.sel = self.lists = None
        if plan.L:
            self.sel = select(u, topk, plan.window, plan.BS, fractional=backward)
            # One list per selected block of the chunk layout (dummy blocks: empty lists).
            lists = self.sel.block_index.reshape(plan.R, plan.NBs, plan.L)
            self.lists = F.pad(lists, (0, 0, 0, plan.NBsp - plan.NBs), value=-1).view(-1, plan.L)
        self.u64 = u.detach().reshape(plan.R, plan.S).to(torch.float64).contiguous()
        self.qs = plan.blocks(q, ct, scale=scale)
        # The fused window kernel wants one head size for k and v: pad both to max(D, Dv) there.
        width = max(plan.D, plan.Dv) if fused else None
        self.kbuf, self.vbuf = plan.buffer(k, ct, width), plan.buffer(v, ct, width)
        if plan.Wn:
            self.band = plan.band_bias(ct)


def _window_part_tiles(plan: _Plan, x: _Inputs, f0: int, f1: int) -> tuple[Tensor, Tensor]:
    s = _window_logits(plan, x, x.qs[f0:f1], f0, f1)
    return _softmax_part(s, plan.spans(x.vbuf, f0, f1)[..., : plan.Dv])


@torch.no_grad()
def forward(q: Tensor, k: Tensor, v: Tensor, u: Tensor, topk: int, window: int, scale: float,
            block_m: int = BLOCK_M) -> tuple[Tensor, Tensor]:
    """out [B, Hq, S, Dv] (dtype of q), lse [B, Hq, S] (``lse_dtype``). Shapes as DESIGN.md section 2.

    The selected pairs and the window are two softmax parts merged through their lse. On CPU
    the window part runs in ATen's fused attention kernel (``cpu_fused.py``)."""
    plan = _Plan(q, k, v, topk, window, block_m, SEL_BLOCKS)
    G = plan.G
    if plan.S == 0:
        return q.new_empty(plan.B, plan.Hq, 0, plan.Dv), q.new_empty(plan.B, plan.Hq, 0, dtype=lse_dtype(q.dtype))
    fused = q.device.type == "cpu" and FUSED and cpu_fused.available() and plan.Wn > 0
    x = _Inputs(plan, q, k, v, u, topk, scale, fused)
    window_part = cpu_fused.window_part(plan, x) if fused else _window_part_tiles
    out = q.new_empty(plan.B, plan.Hq, plan.S, plan.Dv)
    lse = q.new_empty(plan.B, plan.Hq, plan.S, dtype=lse_dtype(q.dtype))
    for f0, f1 in plan.chunks():
        parts = []
        if plan.L:
            part = _Selected(plan, x, f0, f1)
            if part.width:
                _, s = part.logits(plan.to_sel(x.qs, f0, f1), G)
                o, m = _softmax_part(s, part.v, part.p)
                ns = o.shape[0]
                o = plan.from_sel(o.view(ns, G * plan.BS, -1), f1 - f0)
                parts.append((o, plan.from_sel(m.view(ns, G * plan.BS, 1), f1 - f0)[..., 0]))
        if plan.Wn:
            parts.append(window_part(plan, x, f0, f1))
        o, m = _merge(parts)
        plan.put(out, f0, f1, o)
        plan.put(lse[..., None], f0, f1, m[..., None])
    return out, lse


@torch.no_grad()
def backward(grad_out: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, u: Tensor,
             out: Tensor, lse: Tensor, topk: int, window: int, scale: float,
             block_m: int = BLOCK_M) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, du, each contiguous in the shape and dtype of its input."""
    plan = _Plan(q, k, v, topk, window, block_m, SEL_BLOCKS)
    R, S, G, BM, L = plan.R, plan.S, plan.G, plan.BM, plan.L
    if S == 0:
        return (torch.zeros_like(q).contiguous(), torch.zeros_like(k).contiguous(),
                torch.zeros_like(v).contiguous(), torch.zeros_like(u).contiguous())
    x = _Inputs(plan, q, k, v, u, topk, scale, backward=True)
    ct = x.ct
    dob = plan.blocks(grad_out, ct)
    # Per query row: dlse - delta (delta = do . o), and lse; padded rows get lse = +inf, so that
    # they attend to nothing here.
    shift = -(grad_out.to(ct) * out.to(ct)).sum(-1, keepdim=True)
    if grad_lse is not None:
        shift = shift + grad_lse.to(ct)[..., None]
    shift = plan.blocks(shift, ct)
    lseb = plan.blocks(lse[..., None], ct, fill=float("inf"))
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dkbuf, dvbuf = torch.zeros_like(x.kbuf), torch.zeros_like(x.vbuf)
    du = torch.zeros(R * S, dtype=torch.float64, device=q.device)
    c = torch.zeros(R, plan.P, dtype=torch.float64, device=q.device)  # c_i by query position
    if L:
        n_frac = F.pad(x.sel.n_frac.view(R, S).clamp_min(1), (0, plan.P - S), value=1)
    for f0, f1 in plan.chunks():
        nc = f1 - f0
        qs, do, sh = x.qs[f0:f1], dob[f0:f1], shift[f0:f1]
        lse_c = lseb[f0:f1]
        dqc = None
        part = _Selected(plan, x, f0, f1) if L else None
        if part is not None and part.width:
            # The selected part works on blocks of BS queries: regroup its inputs.
            qs_s, do_s = plan.to_sel(x.qs, f0, f1), plan.to_sel(dob, f0, f1)
            ns, BS = qs_s.shape[0], plan.BS
            qk, a = part.logits(qs_s, G)
            a = a.sub_(plan.to_sel(lseb, f0, f1).view(ns, G, BS, 1)).exp_()  # the softmax weights
            dov = torch.matmul(do_s, part.v.transpose(-1, -2)).view_as(a)
            ds = (dov * part.p).add_(plan.to_sel(shift, f0, f1).view(ns, G, BS, 1)).mul_(a)  # dL/ds
            dsp = (ds * part.p).view(ns, G * BS, -1)
            dqc = plan.from_sel(torch.matmul(dsp, part.k), nc)
            dkbuf[:, : plan.D].index_add_(0, part.idx, torch.matmul(dsp.transpose(-1, -2), qs_s).view(-1, plan.D))
            ap = (a * part.p).view(ns, G * BS, -1)
            dvbuf[:, : plan.Dv].index_add_(0, part.idx, torch.matmul(ap.transpose(-1, -2), do_s).view(-1, plan.Dv))
            g = a.mul_(dov).addcmul_(qk, ds).sum(1, keepdim=True)  # dL/dp, GQA heads summed
            g = torch.where(part.fractional(), g, 0.0).to(torch.float64)[:, 0]  # [ns, BS, L]
            du.index_add_(0, part.flat.view(-1), g.sum(1).view(-1))
            span = slice(part.g0, part.g0 + ns)  # c and n_frac by selected block: [R * NBsp, BS]
            c.view(-1, BS)[span] = g.sum(-1) / n_frac.view(-1, BS)[span]
        if plan.Wn:
            kw = plan.spans(x.kbuf, f0, f1)[..., : plan.D]
            vw = plan.spans(x.vbuf, f0, f1)[..., : plan.Dv]
            a = _window_logits(plan, x, qs, f0, f1).sub_(lse_c).exp_()
            dsw = torch.matmul(do, vw.transpose(-1, -2)).add_(sh).mul_(a)
            dqc = torch.matmul(dsw, kw) if dqc is None else dqc.baddbmm_(dsw, kw)
            rows = ((torch.arange(f0, f1, device=q.device) * BM)[:, None] + torch.arange(plan.Wn, device=q.device)).view(-1)
            dkbuf[:, : plan.D].index_add_(0, rows, torch.matmul(dsw.transpose(-1, -2), qs).view(-1, plan.D))
            dvbuf[:, : plan.Dv].index_add_(0, rows, torch.matmul(a.transpose(-1, -2), do).view(-1, plan.Dv))
        plan.put(dq, f0, f1, dqc.mul_(scale))
    dk = plan.unbuffer(dkbuf)[..., : plan.D]
    dv = plan.unbuffer(dvbuf)[..., : plan.Dv]
    du = du.view(R, S)
    if L:
        du = du - _fractional_share(c[:, :S], *fractional_ranges(x.sel.tau, x.u64, window))
    return (dq, dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(),
            du.reshape(u.shape).to(u.dtype).contiguous())


def _fractional_share(c: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``sum_{i : l in F_i} c_i`` for every pair l, [R, S] float64, from c [R, S] and the
    ranges ``lo[l] <= i < hi[l]`` of queries with l in F_i (``selection.fractional_ranges``):
    a difference of prefix sums of c (fact 5)."""
    cs = torch.cat([c.new_zeros(c.shape[0], 1), c.cumsum(1)], 1)
    return cs.gather(1, hi) - cs.gather(1, lo)


from . import cpu_fused  # noqa: E402  (imports this module's _Plan and _Inputs)
