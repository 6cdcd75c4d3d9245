"""Triton forward of SPARSEK attention: one program per (block of queries, KV head), the G query
heads of the KV head's GQA group processed together, so every key gathered serves G heads.

What a program does (DESIGN.md section 3, fact 3)
    1. Loads its q tile once, scaled by ``scale * log2(e)`` and kept in the input dtype (the
       softmax runs in base 2: ``exp2`` is one GPU instruction).
    2. Walks its block's gather list (``Selection.block_index``): the selected pairs of its
       queries, gathered by index in chunks of BN keys, stopping at an upper bound of the list's
       true length (``common.list_bound``, from one vector load: no host sync). Weights
       ``p = clip(u_j - tau_i, 0, 1)``: scores and thresholds are shifted by one float32 block
       constant (``common.block_shift32``), the thresholds in float64 once per row, the
       float32 scores exactly in float32 (no float64 in the loop; float64 scores take a float64
       subtraction per key), then float32 on the tile. The selection mask is one unsigned
       compare per score (``common.key_intervals``, ``in_interval``), and a chunk whose pairs
       every query of the block selects (``covers_block``) skips it: with random scores about
       half the chunks at BMQ = 128 and 90% at BMQ = 16; with a recency slope in the scores,
       evictions are spread over every chunk and nearly all need the mask.
    3. Reads its window span, ``window + BMQ - 1`` consecutive keys, in one loop of chunks
       (``common.window_parts``): the chunks of the left and right edges get the window mask
       (``in_window_u32``), the middle ones, seen by every query of the block, none at all.
    4. One online softmax (``common.softmax_step_exp2``) over both parts; writes o and the lse
       (natural log, float32) that the backward needs. Rows whose tau is NaN (a non-finite
       score among their candidates) are set to NaN there, once; inside the loops every weight
       of the other rows is finite (non-finite scores are read as 0, and ``common.clip01_num``),
       so a non-finite score cannot leak into other rows.

Tile layout (``common.tile_rows``): ``BM = common.rows_per_tile(BLOCK_M, G)`` rows, row m =
(query ``i0 + m // G``, query head ``h * G + m % G``), ``BMQ = BM // G`` queries per block,
``i0 = pid_m * BMQ``. Rows past ``BMQ * G`` (G not a power of two) and queries ``>= S`` are
padding: computed on, never stored. Dots run in the input dtype (tensor cores for bf16/fp16,
IEEE float32 for float32: no TF32) with float32 accumulation; softmax state is float32.

Tensors (R = B * Hkv rows of the selection, NB = ceil(S / BMQ) query blocks):
    q [B, Hq, S, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv]: any strides, one dtype
        (float16, bfloat16, float32); D, Dv: any sizes (tiles pad them to powers of two >= 16).
    u [B, Hkv, S] scores, any strides (float32/float64 read as is, other dtypes upcast first;
        float64 scores beyond the float32 range are not supported by the float32 shift).
    tau [R, S] float64, evict [R, S] int, block_index [R, NB, L] int (ascending, -1 padded,
        ``L = min(topk + BMQ, S)``): the Selection of ``selection_for`` with ``block_m = BMQ``.
    out [B, Hq, S, Dv] (dtype of q), lse [B, Hq, S] float32.
Grid: (NB, R), query blocks fastest, so the programs running together share a KV head and
find its keys in L2.

Python side: ``forward`` (the backend's entry, same contract as ``cpu.forward``; float64 inputs
take the PyTorch path), ``config`` (the launch ``Config`` per head dims and dtype), and
``selection_for`` (the one call of the selection: the Triton walk on CUDA, PyTorch elsewhere).

Kernel side: ``fwd_rows`` is one program's whole computation without its stores; the eager
kernel ``_sparsek_fwd`` adds the stores, and the Inductor template (``sparsek_lowering``) calls
the same function and stores through Inductor, so compiled and eager runs share this code.

Not done yet: tile configs are a hand-picked table (``config``, from register and instruction
counts of sm_90 builds), not timed on the GPU (bench/gpu_forward_configs.py does that); the
selected part costs ~22 SASS instructions per score against ~12 for the window part (weights,
masks, per-key loads); no warp specialisation or TMA (the selected
keys are a gather; Triton 3.6 has no TMA gather on Hopper); the softmax rescales acc every
chunk unless ``Config.lazy_rescale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import cpu
from ..cpu import lse_dtype
from ..selection import Selection
from . import common, selection_cache
from .selection import select_for

LOG2E = 1.4426950408889634
LIST_SAMPLES = 128  # entries sampled by common.list_bound


@triton.jit
def fwd_rows(
    Q, K, V, U, TAU, EVICT, LISTS,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sub, suh, sus,
    S, L, NB, Hkv, window, qscale, pid_m, r,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, HAS_SEL: tl.constexpr, U64: tl.constexpr, NSAMP: tl.constexpr,
    LAZY: tl.constexpr, PRECISION: tl.constexpr,
):
    """The whole computation of one program (query block ``pid_m``, selection row ``r = b * Hkv
    + h``), without its stores: the one source of the forward's math, called by the eager kernel
    ``_sparsek_fwd`` and by the Inductor template (``sparsek_lowering``), which store the results
    their own way (the template through Inductor's ``store_output``, so that pointwise epilogues
    fuse into it). Returns o [BM, BDV] float32 (normalised), lse [BM] float32 (natural log), the
    batch b (int64), each row's query head hq [BM] (int64), position qi [BM] and realness [BM]."""
    BMQ: tl.constexpr = BM // G
    b = (r // Hkv).to(tl.int64)
    h = r % Hkv
    i0 = pid_m * BMQ
    qi, g, real = common.tile_rows(pid_m, S, BM, G)
    hq = (h * G + g).to(tl.int64)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q = tl.load(Q + b * sqb + hq[:, None] * sqh + qi[:, None].to(tl.int64) * sqs + offs_d[None, :] * sqd,
                mask=real[:, None] & (offs_d[None, :] < D), other=0.0)
    q = (q * qscale).to(Q.dtype.element_ty)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    kbase = K + b * skb + h.to(tl.int64) * skh
    vbase = V + b * svb + h.to(tl.int64) * svh
    dmask = offs_d[None, :] < D
    dvmask = offs_dv[None, :] < DV
    if HAS_SEL:
        ubase = U + b * sub + h.to(tl.int64) * suh
        TAU_ROW = TAU + r.to(tl.int64) * S
        EVICT_ROW = EVICT + r.to(tl.int64) * S
        LIST_ROW = LISTS + (r.to(tl.int64) * NB + pid_m) * L
        shift = common.block_shift32(TAU_ROW, pid_m, S, BMQ)
        tau_i = tl.load(TAU_ROW + tl.minimum(qi, S - 1))  # [BM] float64
        poisoned = tau_i != tau_i  # NaN: a non-finite score among the candidates; set at the end
        tau_s = (tau_i - shift.to(tl.float64)).to(tl.float32)
        for start in range(0, common.list_bound(LIST_ROW, L, NSAMP), BN):
            offs = start + tl.arange(0, BN)
            # padding slots read position 0 and are masked (by their lo)
            j, lo = common.list_entries(tl.load(LIST_ROW + offs, mask=offs < L, other=-1).to(tl.int32), True, window)
            jo = j.to(tl.int64)
            kt = tl.load(kbase + jo[:, None] * sks + offs_d[None, :] * skd, mask=dmask, other=0.0)
            vt = tl.load(vbase + jo[:, None] * svs + offs_dv[None, :] * svd, mask=dvmask, other=0.0)
            # A non-finite score is selected by poisoned rows only (set to NaN at the end); in
            # the other rows of the block its weight meets a masked score, and e * p must be 0
            # there. As 0 here, its weights are finite whatever tl.maximum does with NaN (the
            # GPU's max drops it; triton 3.7's interpreter propagated it). One select per key.
            u_j = tl.load(ubase + jo * sus)
            u_j = tl.where(tl.abs(u_j) < float("inf"), u_j, 0.0)
            if U64:
                u_s = (u_j - shift.to(tl.float64)).to(tl.float32)
            else:
                u_s = u_j - shift
            n = common.key_intervals(j, tl.load(EVICT_ROW + jo).to(tl.int32), window)
            p = common.weights32(u_s, tau_s)
            s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * p
            if common.covers_block(lo, n, i0, i0 + BMQ) == 0:
                s = tl.where(common.in_interval(qi, lo, n), s, float("-inf"))
            if LAZY:
                m_i, l_i, acc = common.softmax_step_exp2_lazy(m_i, l_i, acc, s, p, vt, PRECISION)
            else:
                m_i, l_i, acc = common.softmax_step_exp2(m_i, l_i, acc, s, p, vt, PRECISION)
    if window > 0:
        # One loop over the span: the chunks of [b, c) are seen by every query, the edges are masked.
        a, b_full, c_full, d = common.window_parts(i0, BMQ, S, window, BN)
        for p0 in range(a, tl.maximum(c_full, d), BN):
            pos = p0 + tl.arange(0, BN)
            pc = tl.minimum(pos, S - 1).to(tl.int64)  # the right edge may run past S
            kt = tl.load(kbase + pc[:, None] * sks + offs_d[None, :] * skd, mask=dmask, other=0.0)
            vt = tl.load(vbase + pc[:, None] * svs + offs_dv[None, :] * svd, mask=dvmask, other=0.0)
            s = tl.dot(q, tl.trans(kt), input_precision=PRECISION)
            if (p0 < b_full) | (p0 >= c_full):
                s = tl.where(common.in_window_u32(pos, qi, window), s, float("-inf"))
            if LAZY:
                m_i, l_i, acc = common.softmax_step_exp2_lazy(m_i, l_i, acc, s, 1.0, vt, PRECISION)
            else:
                m_i, l_i, acc = common.softmax_step_exp2(m_i, l_i, acc, s, 1.0, vt, PRECISION)
    # l = 0: the row saw nothing (padding only).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    if HAS_SEL:
        o = tl.where(poisoned[:, None], float("nan"), o)
        lse = tl.where(poisoned, float("nan"), lse)
    return o, lse, b, hq, qi, real


@triton.jit
def _sparsek_fwd(
    Q, K, V, U, TAU, EVICT, LISTS, OUT, LSE,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod, sub, suh, sus,
    S, L, NB, Hkv, window, qscale,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, HAS_SEL: tl.constexpr, U64: tl.constexpr, NSAMP: tl.constexpr,
    LAZY: tl.constexpr, PRECISION: tl.constexpr,
):
    """The eager kernel: ``fwd_rows``, then o into OUT (any strides, OUT's dtype) and lse into
    LSE (contiguous [B, Hq, S] float32)."""
    o, lse, b, hq, qi, real = fwd_rows(
        Q, K, V, U, TAU, EVICT, LISTS, sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sub, suh, sus,
        S, L, NB, Hkv, window, qscale, tl.program_id(0), tl.program_id(1),
        G, D, DV, BD, BDV, BM, BN, HAS_SEL, U64, NSAMP, LAZY, PRECISION)
    offs_dv = tl.arange(0, BDV)
    tl.store(OUT + b * sob + hq[:, None] * soh + qi[:, None].to(tl.int64) * sos + offs_dv[None, :] * sod,
             o.to(OUT.dtype.element_ty), mask=real[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + (b * Hkv * G + hq) * S + qi, lse, mask=real)


@dataclass(frozen=True)
class Config:
    """Launch configuration. block_m: requested tile rows (``common.rows_per_tile`` raises it to
    a power of two >= G; the block has ``rows // G`` queries); block_n: keys per chunk."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    lazy_rescale: bool = False  # common.softmax_step_exp2_lazy instead of softmax_step_exp2


def config(D: int, Dv: int, dtype: torch.dtype, G: int) -> Config:
    """Tile sizes for head dims D, Dv, the input dtype and the group size G (G only matters
    through rows_per_tile). Picked from the sm_90 builds (registers, spills, SASS instructions
    per score), then timed on the H100 for D = 128 bf16 (bench/NOTES.md, "forward configs":
    128:64:8 with 3 stages beat 2 stages by 5-7%): a thread should hold at most 32 scores of the [BM, BN]
    tile (BM * BN <= 1024 * num_warps), BN = 64 needs fewer instructions per score than 32
    (per-row reductions and the acc rescale amortised), and IEEE float32 dots (FMA units)
    need two stages to stay off local memory. bench/gpu_forward_configs.py times the candidates."""
    width = max(D, Dv)
    if dtype == torch.float32:
        return Config(64, 32, 4, 2) if width <= 128 else Config(32, 32, 4, 2)
    if width <= 64:
        return Config(128, 64, 8, 3)
    if width <= 128:
        return Config(128, 64, 8, 3)  # 255 registers, a few spills outside the hot path
    return Config(64, 32, 8, 2)


def block_queries(D: int, Dv: int, dtype: torch.dtype, G: int, cfg: Config | None = None) -> int:
    """Queries per block of the forward (and the ``block_m`` of its selection) for head dims
    D, Dv, the input dtype and group size G; ``cfg`` overrides ``config``."""
    cfg = cfg or config(D, Dv, dtype, G)
    return common.queries_per_block(common.rows_per_tile(cfg.block_m, G), G)


def selection_for(u: Tensor, topk: int, window: int, block_m: int) -> Selection:
    """The one place the forward gets its selection (tau, evict and the gather lists of blocks of
    ``block_m`` queries): the Triton walk on CUDA tensors, the PyTorch search elsewhere."""
    return select_for(u, topk, window, block_m, fractional=False)


def forward(q: Tensor, k: Tensor, v: Tensor, u: Tensor, topk: int, window: int, scale: float,
            cfg: Config | None = None, sel: Selection | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as ``cpu.forward``. ``cfg`` overrides ``config``; ``sel`` passes a
    precomputed selection (its ``block_m`` must be this config's queries per block; benchmarks
    use it to time the kernel alone). No host sync."""
    if q.dtype == torch.float64:  # the kernel keeps float32 softmax state: float64 takes the PyTorch path
        return cpu.forward(q, k, v, u, topk, window, scale)
    B, Hq, S, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    cfg = cfg or config(D, Dv, q.dtype, G)
    BM = common.rows_per_tile(cfg.block_m, G)
    BMQ = block_queries(D, Dv, q.dtype, G, cfg)
    out = torch.empty(B, Hq, S, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    if S == 0 or B * Hkv == 0:
        return out, lse.to(lse_dtype(q.dtype))
    R = B * Hkv
    NB = -(-S // BMQ)
    u_in = u  # the op's input: the key under which the backward finds this call's selection
    if u.dtype not in (torch.float32, torch.float64):
        u = u.float()
    if topk > 0:
        if sel is None:
            sel = selection_for(u, topk, window, BMQ)
            if any(x.requires_grad for x in (q, k, v, u_in)):  # a backward may follow
                selection_cache.remember(u_in, topk, window, sel)
        if sel.block_m != BMQ:
            raise ValueError(f"selection built for blocks of {sel.block_m} queries, the kernel uses {BMQ}")
        tau, evict, lists = sel.tau.contiguous(), sel.evict.contiguous(), sel.block_index.contiguous()
        L = lists.shape[-1]
    else:
        tau = evict = lists = torch.empty(1, dtype=torch.int32, device=q.device)
        L = 0
    _sparsek_fwd[(NB, R)](
        q, k, v, u, tau, evict, lists, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *u.stride(),
        S, L, NB, Hkv, window, scale * LOG2E,
        G=G, D=D, DV=Dv, BD=common.dot_width(D), BDV=common.dot_width(Dv),
        BM=BM, BN=cfg.block_n, HAS_SEL=L > 0, U64=u.dtype == torch.float64, NSAMP=LIST_SAMPLES,
        LAZY=cfg.lazy_rescale, PRECISION="ieee",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse.to(lse_dtype(q.dtype))
