"""Triton backward of SPARSEK attention: dq, dk, dv and du (DESIGN.md section 3, facts 4-6).

Same math as ``cpu.backward`` (its docstring has the formulas); per query i (a tile row) and
attended key j, with ``s_ij = scale * p_ij * (q_i . k_j)`` (p = 1 for window pairs)::

    a_ij = exp(s_ij - lse_i),  dp_ij = do_i . v_j,  shift_i = dlse_i - delta_i,  delta_i = do_i . o_i
    ds_ij = a_ij (p_ij dp_ij + shift_i)
    dq_i = scale sum_j ds_ij p_ij k_j,  dk_j = scale sum_i ds_ij p_ij q_i,  dv_j = sum_i a_ij p_ij do_i
    g_ij = a_ij dp_ij + scale (q_i . k_j) ds_ij                    (dL/dp_ij, selected pairs)
    c_i = sum_{j in T_i ∩ F_i} g_ij / max(1, |F_i|)                 (g summed over the G heads)
    du_l = sum_{i : l in T_i ∩ F_i} g_il - sum_{i : l in F_i} c_i

Tile layout: ``common.py`` (a tile's BM rows are BMQ = BM // G queries x the G query heads of
one KV head, so the keys a block gathers serve the whole group). Kernels, none with atomics:

* ``_bwd_query_block``, one program per (query block, KV head, batch): recomputes the block's
  gather list (selected pairs) and window span, accumulates dq, and writes ``sum_j g_ij`` of every
  tile row (the numerator of c_i; each query row belongs to exactly one program).
* ``_bwd_window_keys``, one program per (block of BN consecutive keys, KV head, batch),
  FlashAttention-2 style: sweeps the query blocks whose windows hold its keys (key j is in the
  windows of the queries ``j .. j + window - 1``) and accumulates their dk, dv in registers.
  The blocks that see every key of the program run without the window mask, in a loop of their
  own (the query kernel's window part likewise, by ``window_parts``): 30% less time at 32K.
* ``slots.py`` adds the selected pairs' dk, dv and du's first term: each pair's first query
  block over consecutive positions, the later ones slot by slot (fact 6).

The two attention kernels keep their per-program computation in store-free functions
(``query_rows``, ``window_key_cols``) that the Inductor templates call too; ``backward`` runs the
stages ``prepare`` -> window keys -> ``slots.add_selected_grads`` -> query kernel -> ``finish_du``,
the same ones the lowering runs (``backward_ops.py`` wraps the non-template stages as ops).

So every sum has a fixed order and repeated runs are bitwise identical, with or without
``torch.use_deterministic_algorithms``. (Relaxed atomics from the query kernel were 2.4x slower
at 32K; bench/NOTES.md has every version's numbers.)

F_i is tested by ranges of queries per pair (``selection.fractional_ranges``, fact 4), the same
ranges |F_i| is counted from; du's second term is a prefix sum over queries (fact 5), in PyTorch.

Precision: the dots run in the input dtype (tensor cores for bf16/fp16; IEEE float32, not TF32,
for float32 inputs), with float32 accumulation; g and the du sums are float64 once summed over a
tile. float64 inputs fall back to ``cpu.backward`` (GPUs and the interpreter run float64 dots
poorly, and float64 is for gradcheck, not speed).

NaN scores: a poisoned query (tau NaN, lse NaN) gives NaN dq and NaN dk, dv for exactly the
keys it attends (its selected pairs and its window); du stays finite, as in ``cpu.backward``
(whose dk, dv NaN set is a superset: it poisons the whole gather list and span of the block).

No host synchronisation and no data-dependent shapes here. The selection comes from
``selection.select_for``: the Triton walk on CUDA tensors, the PyTorch search elsewhere.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import cpu
from ..cpu import _fractional_share
from ..selection import fractional_ranges, padded_lists, range_counts
from . import selection_cache
from .forward import config as forward_config
from .selection import select_for
from .slots import add_selected_grads
from .common import (block_shift32, dot_width, in_interval, in_window_u32, key_intervals, list_entries, load_rows,
                     queries_per_block, rows_per_tile, tile_rows, weights32, window_parts)


@triton.jit
def _window_dq(q2, do, lse2, sh, qi, dq, start, hi, kbase, vbase, sks, skd, svs, svd, window,
               D: tl.constexpr, DV_: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
               PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """dq's part from the window keys start .. start + BN - 1 (below hi; MASKED: with the window
    mask, else every row of the tile sees every key)."""
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    pos = start + tl.arange(0, BN)
    # Keys at or past hi (the block's end) are in no real row's window, and rows never mix here
    # (padding rows are not stored): clamped unmasked loads and one unsigned compare per score.
    # (The masked edges' three compares and row mask went through bits of general registers
    # in the sm_90 build; bench/sm90_build.py.)
    pc = tl.minimum(pos, hi - 1).to(tl.int64)
    kj = tl.load(kbase + pc[:, None] * sks + offs_d[None, :] * skd, mask=offs_d[None, :] < D, other=0.0)
    vj = tl.load(vbase + pc[:, None] * svs + offs_dv[None, :] * svd, mask=offs_dv[None, :] < DV_, other=0.0)
    qk2 = tl.dot(q2, tl.trans(kj), input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(vj), input_precision=PRECISION)
    if MASKED:
        win = in_window_u32(pos, qi, window)
        a = tl.where(win, tl.exp2(qk2 - lse2[:, None]), 0.0)
        ds = tl.where(win, a * (dp + sh[:, None]), 0.0)
    else:
        a = tl.exp2(qk2 - lse2[:, None])
        ds = a * (dp + sh[:, None])
    return dq + tl.dot(ds.to(kj.dtype), kj, input_precision=PRECISION)


@triton.jit
def query_rows(
    Q, K, V, DO, LSE, SHIFT, U, TAU, EVICT, FRAC, LISTS, COUNTS,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
    S, L, NBQ, Hq, Hkv, window, scale, pid_m, h, b,
    G: tl.constexpr, D: tl.constexpr, DV_: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr,
    HAS_SEL: tl.constexpr, HAS_WIN: tl.constexpr,
):
    """The query kernel's computation for query block ``pid_m`` of KV head h, batch b, without
    its stores (shared by ``_bwd_query_block`` and the Inductor template): returns dq [BM, BD]
    float32 (scaled), the per-row sums of g for c_i [BM] float64 (zeros without HAS_SEL), and
    the rows' query position qi, head in the group g and realness [BM]."""
    BMQ: tl.constexpr = BM // G
    r64 = (b * Hkv + h).to(tl.int64)
    qi, g, real = tile_rows(pid_m, S, BM, G)
    q, do, lse, sh = load_rows(Q, DO, LSE, SHIFT, b, h, qi, g, real, Hq, S,
                                sqb, sqh, sqs, sqd, sdb, sdh, sds, sdd, G, D, DV_, BD, BDV)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    kbase = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    vbase = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    dq = tl.zeros([BM, BD], tl.float32)
    # Base-2 exponent as the forward: q scaled once by scale * log2(e) (rounded to the input
    # dtype, as the forward's lse saw it), lse in base 2; qk2 * LN2 is scale * q.k again.
    q2 = (q * (scale * 1.4426950408889634)).to(q.dtype)
    lse2 = lse * 1.4426950408889634
    c_acc = tl.zeros([BM], tl.float64)
    if HAS_SEL:
        tau = tl.load(TAU + r64 * S + tl.minimum(qi, S - 1))  # float64 [BM]
        # Scores and thresholds shifted by one float32-exact block constant (common.block_shift32):
        # float64 once per row and key, float32 per score.
        shift32 = block_shift32(TAU + r64 * S, pid_m, S, BMQ)
        tau_s = (tau - shift32.to(tl.float64)).to(tl.float32)
        # Gather lists are compact (padding at the end): walk only the block's COUNTS [R, NBQ] pairs.
        n_sel = tl.load(COUNTS + r64 * NBQ + pid_m)
        for start in range(0, n_sel, BN):
            offs_n = start + tl.arange(0, BN)
            # The list's row has L >= n_sel entries: offsets clamped into it instead of a masked
            # load (whose mask the pipeline would carry to the scores' stage).
            jr = tl.load(LISTS + (r64 * NBQ + pid_m) * L + tl.minimum(offs_n, L - 1))
            jc, lo = list_entries(jr, offs_n < n_sel, window)
            jc64 = jc.to(tl.int64)
            # Padding entries read position 0's key, value, score and ranges, as the forward's, and
            # are masked by their lo, so p = 0 (masks on these loads cost a predicate per entry carried
            # across the pipeline's stages: bits of general registers in the sm_90 build).
            kj = tl.load(kbase + jc64[:, None] * sks + offs_d[None, :] * skd, mask=offs_d[None, :] < D, other=0.0)
            vj = tl.load(vbase + jc64[:, None] * svs + offs_dv[None, :] * svd, mask=offs_dv[None, :] < DV_,
                         other=0.0)
            u_s = (tl.load(U + r64 * S + jc64) - shift32.to(tl.float64)).to(tl.float32)
            n = key_intervals(jc, tl.load(EVICT + r64 * S + jc64), window)
            f0 = tl.load(FRAC + (r64 * S + jc64) * 2)
            f1 = tl.load(FRAC + (r64 * S + jc64) * 2 + 1)
            # T_i ∩ F_i is one interval of queries per pair, [f0, min(lo + n, f1)) (F's range
            # starts at or after the selection's, lo: fractional_ranges): one compare per score
            # later, as for the selection (empty for padding, whose lo + n is below 0).
            f_n = tl.maximum(tl.minimum(lo + n, f1) - f0, 0)
            # The selection mask is used once, here: p is 0 off the selection, so ds * p and the
            # dq dot vanish there whatever a is, and the other tiles need no mask. (Keeping the
            # mask for a and ds too held 2 x 16 booleans per thread across the dots: the sm_90
            # build spilled them to bits of general registers, ~200 extra instructions per
            # chunk; bench/sm90_build.py.) Padding rows need no mask either: rows never mix
            # in this kernel, and theirs are not stored.
            p = tl.where(in_interval(qi, lo, n), weights32(u_s, tau_s), 0.0)
            qk2 = tl.dot(q2, tl.trans(kj), input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(vj), input_precision=PRECISION)
            # On the selection a <= 1 up to rounding (lse bounds every score); the clamp keeps a
            # finite off it, where the exponent is -lse2 (p = 0), so that ds * p is 0 there. A
            # poisoned row (lse, shift NaN) still gets NaN ds, and dq, through shift.
            a = tl.exp2(tl.minimum(qk2 * p - lse2[:, None], 0.0))
            ds = a * (dp * p + sh[:, None])
            dq += tl.dot((ds * p).to(kj.dtype), kj, input_precision=PRECISION)
            # dL/dp on T_i ∩ F_i only (F by the ranges |F_i| is counted from, FRAC); float32 over
            # the tile, float64 across tiles.
            frac = in_interval(qi, f0, f_n)
            c_acc += tl.sum(tl.where(frac, a * dp + (qk2 * 0.6931471805599453) * ds, 0.0), 1).to(tl.float64)
    if HAS_WIN:
        # Window span of the block, positions [a, d) (``window_parts``): the chunks of [b, c) are
        # seen by every query of the block and need no mask, the edges do; three branch-free
        # loops. Padding rows (G not a power of two) are masked everywhere.
        a, b_full, c_full, d = window_parts(pid_m * BMQ, BMQ, S, window, BN)
        if G * BMQ != BM:
            b_full = tl.maximum(c_full, d)
            c_full = b_full
        for start in range(a, b_full, BN):
            dq = _window_dq(q2, do, lse2, sh, qi, dq, start, d, kbase, vbase, sks, skd, svs, svd,
                            window, D, DV_, BD, BDV, BN, PRECISION, True)
        for start in range(b_full, c_full, BN):
            dq = _window_dq(q2, do, lse2, sh, qi, dq, start, d, kbase, vbase, sks, skd, svs, svd,
                            window, D, DV_, BD, BDV, BN, PRECISION, False)
        for start in range(c_full, d, BN):
            dq = _window_dq(q2, do, lse2, sh, qi, dq, start, d, kbase, vbase, sks, skd, svs, svd,
                            window, D, DV_, BD, BDV, BN, PRECISION, True)
    return dq * scale, c_acc, qi, g, real


@triton.jit
def _bwd_query_block(
    Q, K, V, DO, LSE, SHIFT, U, TAU, EVICT, FRAC, LISTS, COUNTS, DQ, CROW,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
    S, L, NBQ, Hq, Hkv, window, scale,
    G: tl.constexpr, D: tl.constexpr, DV_: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr,
    HAS_SEL: tl.constexpr, HAS_WIN: tl.constexpr,
):
    """dq of one query block, and (HAS_SEL) the per-row sums of g for c_i:
    DQ [B, Hq, S, D] contiguous (dtype of q), CROW [R, S, G] float64."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    dq, c_acc, qi, g, real = query_rows(
        Q, K, V, DO, LSE, SHIFT, U, TAU, EVICT, FRAC, LISTS, COUNTS,
        sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
        S, L, NBQ, Hq, Hkv, window, scale, tl.program_id(0), h, b,
        G, D, DV_, BD, BDV, BM, BN, PRECISION, HAS_SEL, HAS_WIN)
    r64 = (b * Hkv + h).to(tl.int64)
    if HAS_SEL:
        tl.store(CROW + (r64 * S + qi) * G + g, c_acc, mask=real)
    offs_d = tl.arange(0, BD)
    hq = (h * G + g).to(tl.int64)
    qc = tl.minimum(qi, S - 1).to(tl.int64)
    tl.store(DQ + ((b.to(tl.int64) * Hq + hq) * S + qc)[:, None] * D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=real[:, None] & (offs_d[None, :] < D))


@triton.jit
def _window_keys_block(Q, DO, LSE, SHIFT, k, v, j, valid, dk, dv, qb, b, h, S, Hq, window, scale,
                       sqb, sqh, sqs, sqd, sdb, sdh, sds, sdd,
                       G: tl.constexpr, D: tl.constexpr, DV_: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                       BM: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One query block of ``_bwd_window_keys``: adds its part to dk [BN, BD], dv [BN, BDV]
    (MASKED: with the window mask; without it every row sees every key)."""
    qi, g, real = tile_rows(qb, S, BM, G)
    q, do, lse, sh = load_rows(Q, DO, LSE, SHIFT, b, h, qi, g, real, Hq, S,
                               sqb, sqh, sqs, sqd, sdb, sdh, sds, sdd, G, D, DV_, BD, BDV)
    # Base 2 (exp2 is one instruction; exp is a multiply and exp2): qk2 = log2(e) scale q.k,
    # lse2 = log2(e) lse, one multiply-add per score before the exponential.
    qk2 = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * 1.4426950408889634)
    lse2 = lse * 1.4426950408889634
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if MASKED:
        # One unsigned compare per score: padding rows sit at 2^30, past every window, and
        # padding keys (j >= S > qi) fall outside by the same compare. (Three compares and the
        # row mask went through bits of general registers in the sm_90 build: 1071 instructions
        # per block, now 722, against 489 unmasked; bench/sm90_build.py.)
        att = in_window_u32(j, tl.where(real, qi, 1 << 30), window)
        a = tl.where(att, tl.exp2(qk2 - lse2[:, None]), 0.0)
        ds = tl.where(att, a * (dp + sh[:, None]), 0.0)
    else:
        a = tl.exp2(qk2 - lse2[:, None])
        ds = a * (dp + sh[:, None])
    dv += tl.dot(tl.trans(a.to(do.dtype)), do, input_precision=PRECISION)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def window_key_cols(
    Q, K, V, DO, LSE, SHIFT,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
    S, Hq, Hkv, window, scale, pid_n, h, b,
    G: tl.constexpr, D: tl.constexpr, DV_: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr,
):
    """dk [BN, BD] (scaled) and dv [BN, BDV], float32, of the BN consecutive keys of block
    ``pid_n`` (KV head h, batch b) from their window queries ``j .. j + window - 1``, with the
    keys' positions jc [BN] (clamped to S - 1) and realness; no stores (shared by
    ``_bwd_window_keys`` and the Inductor template)."""
    BMQ: tl.constexpr = BM // G
    j = pid_n * BN + tl.arange(0, BN)
    valid = j < S
    jc64 = tl.minimum(j, S - 1).to(tl.int64)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    k = tl.load(K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + jc64[:, None] * sks + offs_d[None, :] * skd,
                mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + jc64[:, None] * svs + offs_dv[None, :] * svd,
                mask=valid[:, None] & (offs_dv[None, :] < DV_), other=0.0)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BDV], tl.float32)
    q_hi = tl.minimum(tl.minimum(pid_n * BN + BN, S) - 1 + window, S)
    qb0 = pid_n * BN // BMQ
    qb3 = tl.cdiv(q_hi, BMQ)
    # Query blocks that see every key of the block (j0 + BN - 1 <= i < j0 + window, all real)
    # need no mask: [qb1, qb2); the edges do. Branch-free loops, so that the loads pipeline.
    qb1 = tl.minimum(tl.maximum(tl.cdiv(pid_n * BN + BN - 1, BMQ), qb0), qb3)
    qb2 = tl.maximum(tl.minimum(tl.minimum(pid_n * BN + window, S) // BMQ, qb3), qb1)
    if (G * BMQ != BM) | (pid_n * BN + BN > S):  # padding rows or keys: mask everything
        qb1 = qb3
        qb2 = qb3
    for qb in range(qb0, qb1):
        dk, dv = _window_keys_block(Q, DO, LSE, SHIFT, k, v, j, valid, dk, dv, qb, b, h, S, Hq, window, scale,
                                    sqb, sqh, sqs, sqd, sdb, sdh, sds, sdd, G, D, DV_, BD, BDV, BM, PRECISION, True)
    for qb in range(qb1, qb2):
        dk, dv = _window_keys_block(Q, DO, LSE, SHIFT, k, v, j, valid, dk, dv, qb, b, h, S, Hq, window, scale,
                                    sqb, sqh, sqs, sqd, sdb, sdh, sds, sdd, G, D, DV_, BD, BDV, BM, PRECISION, False)
    for qb in range(qb2, qb3):
        dk, dv = _window_keys_block(Q, DO, LSE, SHIFT, k, v, j, valid, dk, dv, qb, b, h, S, Hq, window, scale,
                                    sqb, sqh, sqs, sqd, sdb, sdh, sds, sdd, G, D, DV_, BD, BDV, BM, PRECISION, True)
    return dk * scale, dv, jc64, valid


@triton.jit
def _bwd_window_keys(
    Q, K, V, DO, LSE, SHIFT, DK, DV,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
    S, Hq, Hkv, window, scale,
    G: tl.constexpr, D: tl.constexpr, DV_: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr,
):
    """dk, dv of BN consecutive keys from their window queries ``j .. j + window - 1``: writes
    DK [R, S, D], DV [R, S, DV] (their pointer's dtype); each key belongs to one program, so
    plain stores. (The selected pairs' parts are slots.py's: with their per-score work in this
    loop, the window sweep ran 5x slower.)"""
    h = tl.program_id(1)
    b = tl.program_id(2)
    dk, dv, jc64, valid = window_key_cols(
        Q, K, V, DO, LSE, SHIFT, sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
        S, Hq, Hkv, window, scale, tl.program_id(0), h, b, G, D, DV_, BD, BDV, BM, BN, PRECISION)
    r64 = (b * Hkv + h).to(tl.int64)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    tl.store(DK + (r64 * S + jc64)[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=valid[:, None] & (offs_d[None, :] < D))
    tl.store(DV + (r64 * S + jc64)[:, None] * DV_ + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=valid[:, None] & (offs_dv[None, :] < DV_))


@triton.jit
def _bwd_shift(DO, O, DLSE, SHIFT, N, Hq, S, sdb, sdh, sds, sdd, sob, soh, sos, sod,
               DV_: tl.constexpr, BDV: tl.constexpr, HAS_DLSE: tl.constexpr, BR: tl.constexpr):
    """SHIFT [B, Hq, S] (float32, contiguous) = dlse - do . o per query row, the dots in float32
    from the input dtype; DLSE contiguous [B, Hq, S] when HAS_DLSE. One pass over do and o, as
    FlashAttention's preprocess: no float32 copies of them."""
    row = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = row < N
    r = tl.where(ok, row, 0)
    s_ = (r % S).to(tl.int64)
    bh = r // S
    hq = (bh % Hq).to(tl.int64)
    b = (bh // Hq).to(tl.int64)
    offs = tl.arange(0, BDV)
    m = ok[:, None] & (offs[None, :] < DV_)
    do = tl.load(DO + (b * sdb + hq * sdh + s_ * sds)[:, None] + offs[None, :] * sdd, mask=m, other=0.0)
    o = tl.load(O + (b * sob + hq * soh + s_ * sos)[:, None] + offs[None, :] * sod, mask=m, other=0.0)
    sh = -tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:
        sh += tl.load(DLSE + row, mask=ok, other=0.0).to(tl.float32)
    tl.store(SHIFT + row, sh, mask=ok)


def _tiles(BD: int, BDV: int) -> tuple[int, int, int]:
    """(requested tile rows, keys per tile, pipeline stages) of the window and slot sweeps for
    padded head dims BD, BDV: 64, 64 and 2 up to 128; 32, 32 and 1 above, so that the q, do, k, v
    tiles and the dk, dv accumulators stay within registers and shared memory."""
    return (64, 64, 2) if max(BD, BDV) <= 128 else (32, 32, 1)


# Timed against other tiles by bench/gpu_backward_configs.py.
def _query_tiles(D: int, Dv: int, dtype: torch.dtype, G: int, BD: int, BDV: int, bm: int, BN: int,
                 stages: int) -> tuple[int, int, int, int]:
    """(requested rows, keys per tile, warps, stages) of the query kernel. Up to head dim 128 its
    blocks are the forward's, so that the forward's selection (gather lists per block) serves
    the backward too (``selection_cache``): 128 rows x 32 keys with 8 warps and 3 stages
    (bf16/fp16), 64 x 64 with 4 warps and 2 stages (fp32). At 32K on the H100, 128:32:8:2 ran
    the query kernel in 3.72 ms and the step in 16.8 ms, against 4.00 and 18.4 for the former
    64:64:4:2 with its own selection; after the unmasked window chunks (session 6) 128:32:8:3
    ran it in 3.19 ms against 3.41 with 2 stages (128:64:8:2/3: 3.97/3.95)."""
    if max(BD, BDV) > 128:
        return bm, BN, 4, stages
    rows = forward_config(D, Dv, dtype, G).block_m
    return (rows, 32, 8, 3) if rows >= 128 else (rows, 64, 4, 2)


@dataclass
class Plan:
    """Tiles and block sizes of one backward call (``plan``)."""

    BD: int
    BDV: int
    BN: int  # keys per window-key program
    meta: dict  # constexprs and stages shared by the window-key and slot kernels
    QM: int  # the query kernel's rows per tile
    QN: int
    q_warps: int
    q_stages: int

    @property
    def QMQ(self) -> int:
        """Queries per block of the query kernel (and of its gather lists)."""
        return queries_per_block(self.QM, self.meta["G"])


def plan(D: int, Dv: int, dtype: torch.dtype, G: int, block_m: int | None = None) -> Plan:
    """The backward's tiles for head dims D, Dv, the input dtype and group size G;
    ``block_m`` as in ``backward``."""
    BD, BDV = dot_width(D), dot_width(Dv)
    bm, BN, stages = _tiles(BD, BDV)
    BM = rows_per_tile(bm if block_m is None else max(16, block_m), G)
    # The query kernel has its own blocks (and gather lists); block_m sets both.
    qm, QN, q_warps, q_stages = _query_tiles(D, Dv, dtype, G, BD, BDV, bm, BN, stages)
    QM = rows_per_tile(qm if block_m is None else max(16, block_m), G)
    meta = dict(G=G, D=D, DV_=Dv, BD=BD, BDV=BDV, BM=BM,
                PRECISION="ieee" if dtype == torch.float32 else "tf32", num_stages=stages)
    return Plan(BD, BDV, BN, meta, QM, QN, q_warps, q_stages)


def _device(dev: torch.device):
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def prepare(grad_out: Tensor, grad_lse: Tensor | None, out: Tensor, u: Tensor, topk: int, window: int,
            block_q: int, list_width: int | None = None):
    """Everything the kernels read besides q, k, v, do and lse, per query row and pair:

    shift [B, Hq, S] float32 (``dlse - do . o``, the ``_bwd_shift`` pass), u64 [R, S] float64,
    and with topk > 0 the selection for query blocks of ``block_q`` (the forward's, left in
    ``selection_cache``, or computed again): tau [R, S] float64, frac [R, S, 2] int32 (F's query
    ranges per pair), evict [R, S] int32 clamped to S, lists [R, NBQ, L] int32 and counts
    [R, NBQ] int32 (list entries per block); ``list_width`` pads L to a fixed width. With
    topk = 0 those five are one-element placeholders. grad_out: the dtype of q."""
    B, Hq, S, Dv = out.shape
    Hkv = u.shape[1]
    R = B * Hkv
    dev = out.device
    BDV = dot_width(Dv)
    shift = torch.empty(B, Hq, S, dtype=torch.float32, device=dev)
    dlse = grad_lse.contiguous() if grad_lse is not None else shift
    BR = max(1, 4096 // BDV)
    with _device(dev):
        _bwd_shift[(triton.cdiv(B * Hq * S, BR),)](
            grad_out, out, dlse, shift, B * Hq * S, Hq, S, *grad_out.stride(), *out.stride(),
            DV_=Dv, BDV=BDV, HAS_DLSE=grad_lse is not None, BR=BR)
    u64 = u.detach().reshape(R, S).to(torch.float64).contiguous()
    if topk == 0:
        tau = torch.zeros(1, dtype=torch.float64, device=dev)
        frac, evict, counts = (torch.zeros(1, dtype=torch.int32, device=dev) for _ in range(3))
        return shift, u64, tau, frac, evict, torch.zeros(1, 1, 0, dtype=torch.int32, device=dev), counts
    sel = selection_cache.take(u, topk, window, block_q) or select_for(u, topk, window, block_q, fractional=False)
    tau = sel.tau.contiguous()
    # F_i by ranges of queries per pair: one source for the kernels' tests and for |F_i|.
    f_lo, f_hi = fractional_ranges(tau, u64, window)
    frac = torch.stack([f_lo, f_hi], -1).to(torch.int32).contiguous()
    # evict clamped to S: the sweeps end there, and int32 cannot overflow.
    evict = sel.evict.clamp_max(S).to(torch.int32).contiguous()
    lists = padded_lists(sel.block_index, list_width)
    counts = (lists >= 0).sum(-1, dtype=torch.int32).contiguous()
    return shift, u64, tau, frac, evict, lists.contiguous(), counts


def finish_du(du: Tensor, crow: Tensor, frac: Tensor) -> Tensor:
    """du [R, S] float64: du's first term (``slots.add_selected_grads``) minus its second,
    ``sum_{i : l in F_i} c_i`` with ``c_i = sum_G crow / |F_i|`` (crow [R, S, G] float64 from the
    query kernel, frac the ranges of ``prepare``): a prefix sum over queries (fact 5)."""
    f_lo, f_hi = frac[..., 0].long(), frac[..., 1].long()
    c = crow.sum(-1) / range_counts(f_lo, f_hi).clamp_min(1)
    return du - _fractional_share(c, f_lo, f_hi)


def backward(grad_out: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, u: Tensor,
             out: Tensor, lse: Tensor, topk: int, window: int, scale: float,
             block_m: int | None = None, n_segments: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of SPARSEK attention, same contract as ``cpu.backward``; deterministic.

    grad_out [B, Hq, S, Dv], grad_lse [B, Hq, S] or None, q [B, Hq, S, D], k [B, Hkv, S, D],
    v [B, Hkv, S, Dv], u [B, Hkv, S], out [B, Hq, S, Dv], lse [B, Hq, S] (float32; float64 for
    float64 inputs); any strides. Returns dq, dk, dv, du, each contiguous with the shape and dtype
    of its input.

    ``block_m``: requested tile rows (``common.rows_per_tile``, at least 16 for ``tl.dot``;
    None: 64, or 32 for head dims above 128). ``n_segments``: the slot sweep's query segments
    (``slots.segments``; tests force it). float64 inputs run ``cpu.backward``.

    Stages (the Inductor lowering runs the same ones): ``prepare``, the window keys' dk, dv,
    the selected pairs' (``slots.add_selected_grads``), the query kernel's dq and c_i sums,
    ``finish_du``.
    """
    if q.dtype == torch.float64:
        return cpu.backward(grad_out, grad_lse, q, k, v, u, out, lse, topk, window, scale)
    B, Hq, S, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G, R = Hq // Hkv, B * Hkv
    dev = q.device
    grad_out = grad_out.to(q.dtype)  # the dots want one dtype (no copy when it already is)
    if S == 0:
        return (torch.zeros(q.shape, dtype=q.dtype, device=dev), torch.zeros(k.shape, dtype=k.dtype, device=dev),
                torch.zeros(v.shape, dtype=v.dtype, device=dev), torch.zeros(u.shape, dtype=u.dtype, device=dev))
    pl = plan(D, Dv, q.dtype, G, block_m)
    NBQ = -(-S // pl.QMQ)
    has_sel, has_win = topk > 0, window > 0
    lse32 = lse.float().contiguous()
    shift, u64, tau, frac, evict, lists, counts = prepare(grad_out, grad_lse, out, u, topk, window, pl.QMQ)
    L = lists.shape[-1]

    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    crow = torch.empty(R, S, G, dtype=torch.float64, device=dev) if has_sel else torch.zeros(1, dtype=torch.float64, device=dev)
    # The window sweep writes every key; the slot sweeps add the selected pairs' parts to them
    # after (float32 buffers then, cast at the end).
    alloc = torch.empty if has_win else torch.zeros
    dk = alloc(R, S, D, dtype=torch.float32 if has_sel else k.dtype, device=dev)
    dv = alloc(R, S, Dv, dtype=torch.float32 if has_sel else v.dtype, device=dev)
    du = torch.zeros(R, S, dtype=torch.float64, device=dev)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    meta = pl.meta
    with _device(dev):
        if has_win:
            _bwd_window_keys[(-(-S // pl.BN), Hkv, B)](
                q, k, v, grad_out, lse32, shift, dk, dv, *strides,
                S, Hq, Hkv, window, scale, BN=pl.BN, **meta)
        if has_sel:
            add_selected_grads(q, k, v, grad_out, lse32, shift, u64, tau, evict.view(R, S), frac, dk, dv, du,
                               topk, window, scale, meta, n_segments)
        _bwd_query_block[(NBQ, Hkv, B)](
            q, k, v, grad_out, lse32, shift, u64, tau, evict, frac, lists, counts, dq, crow, *strides,
            S, L, NBQ, Hq, Hkv, window, scale, HAS_SEL=has_sel, HAS_WIN=has_win,
            **dict(meta, BM=pl.QM, BN=pl.QN, num_warps=pl.q_warps, num_stages=pl.q_stages))
    if has_sel:
        du = finish_du(du, crow, frac)
    return (dq, dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype),
            du.view(u.shape).to(u.dtype).contiguous())
