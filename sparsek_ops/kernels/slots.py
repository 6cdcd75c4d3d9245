"""dk, dv and du's first term of the selected pairs, without atomics: the "slots" of DESIGN.md
section 3, fact 6.

Once the first ``NL = min(topk, S - window)`` candidates have entered, the top-k set has NL
members at every query, and it changes only when a newcomer evicts a member (fact 2): at query
``i = evict[l]`` pair ``l`` leaves and the newcomer ``i - window`` takes its place. So the
selected pairs form NL *chains*: each starts with a pair of the fill phase (the first NL
candidates all enter) and the successor of pair l is ``evict[l] - window``, until a pair stays
to the end (``evict >= S``). The pairs of one chain use consecutive, disjoint query ranges
``[j + window, evict[j])``; every selected pair is in exactly one chain.

* ``slot_of`` numbers the chains by pointer jumping along the successors (each chain ends in a
  distinct pair that stays to the end; log2 S rounds of one gather, no host sync).
* ``_segment_lanes`` writes, for each segment of the query blocks and each slot, the pair that
  holds the slot at the segment's first query (or, in the fill phase, the pair that will).
* ``_bwd_slot_sweep`` with ENTRY, one program per (BS consecutive positions, KV head, batch):
  each pair's part from the query block it enters in (from its entry query on).
* ``_bwd_slot_sweep``, one program per (tile of BS slots, segment, KV head, batch): the later
  blocks. It sweeps the segment's query blocks in order with one pair per slot, FlashAttention
  key-side style (the slot's key and value stay in registers; q and do stream), with dk, dv and
  du's first term accumulated in registers. A slot changes pairs only between blocks: when its
  pair has been evicted, the pair's sums are added to its rows (a plain read-add-write: a pair
  lives in one slot and is evicted in one segment) and the slot moves along its chain to the
  pair that holds it at the next block. The blocks between two slot changes run as one
  branch-free loop (``_sweep_block``), so that its loads pipeline. At the end of a segment, the
  sums of the pairs still in their slots are parked, per slot.
* ``_add_carries``, one program per (tile of slots, KV head, batch), adds the parked sums to
  their pairs, segment after segment; a pair never changes slots, so no two programs meet.

No atomics and a fixed order of every sum: repeated runs are bitwise identical. Tiles are
transposed (slots x query rows): the dk, dv dots take them as they are, and per-slot values
cost few registers. Wider tiles (64 slots, or 8 warps) spilled registers on the H100 and ran
2-3x slower (bench/gpu_slots.py, bench/NOTES.md).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import block_shift32, clip01_num, load_rows, tile_rows

# Launch config of the slot sweep (BS slots x BM query rows per tile): measured on the H100 at
# S = 32K, D = 128 (bench/gpu_slots.py; wider tiles spill registers and run 2-3x slower).
SLOTS_PER_TILE, SWEEP_WARPS, SWEEP_STAGES = 32, 4, 2
# A register cap for the sweep's build (ptxas ``maxnreg``), None: the compiler's choice (255 at
# the default tiles, so 2 programs = 8 warps per SM, and the loop is latency-bound: its
# ~1000 instructions per block would issue in ~1.2 ms at 32K, the sweep took ~4.2). A lever for
# bench/gpu_slots.py's 5th config field, not yet timed (bench/NOTES.md, session 11).
SWEEP_MAXNREG: int | None = None
PROGRAMS_PER_SM = 16  # segments are added until about this many programs per SM (bench/gpu_slots.py)
MIN_SEGMENT_BLOCKS = 4  # ... but a segment keeps at least this many query blocks


def slot_of(evict: Tensor, topk: int, window: int) -> tuple[Tensor, int]:
    """The chain (slot) of every pair: ([R, S] int32, -1 for pairs never selected; NL, the
    number of slots). ``evict`` [R, S] as ``Selection.evict`` (clamped to S or not)."""
    R, S = evict.shape
    nl = max(0, min(topk, S - window))
    dev = evict.device
    e = evict.clamp_max(S).long()
    j = torch.arange(S, device=dev).expand(R, S)
    chosen = e > j + window
    # successor (or the pair itself for pairs never selected and for those that stay)
    succ = torch.where(chosen & (e < S), e - window, j)
    for _ in range(max(1, math.ceil(math.log2(max(S, 2))))):
        succ = succ.gather(1, succ)
    tail = chosen & (e >= S)
    rank = tail.to(torch.int32).cumsum(1, dtype=torch.int32) - 1
    return torch.where(chosen, rank.gather(1, succ), -1).to(torch.int32).contiguous(), nl


def segments(NL: int, R: int, NBQ: int, BS: int, device: torch.device, segments: int | None = None) -> int:
    """Query blocks per segment: enough segments for PROGRAMS_PER_SM programs per SM (few KV
    heads, short batches), none shorter than MIN_SEGMENT_BLOCKS blocks. ``segments`` forces a
    count (tests)."""
    if segments is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
        tiles = -(-NL // BS) * R
        segments = max(1, min(-(-PROGRAMS_PER_SM * sms // tiles), NBQ // MIN_SEGMENT_BLOCKS))
    return -(-NBQ // max(1, min(segments, NBQ)))


@triton.jit
def _segment_lanes(EVICT, SLOT, LANES, S, NL, NZ, SEGQ, topk, window, BLOCK: tl.constexpr):
    """LANES [R, NZ, NL] int32: the pair in slot s at the first query za of segment z, i.e. the
    pair with ``j + window <= za < evict[j]``, or the slot's first pair (j < topk) while it has
    not entered yet. Exactly one pair per (segment, slot), so plain stores."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    z = tl.program_id(1)
    r64 = tl.program_id(2).to(tl.int64)
    za = z * SEGQ
    inb = j < S
    e = tl.load(EVICT + r64 * S + j, mask=inb, other=0)
    s = tl.load(SLOT + r64 * S + j, mask=inb, other=-1)
    m = inb & (s >= 0) & (s < NL) & (e > za) & ((j + window <= za) | (j < topk))
    tl.store(LANES + (r64 * NZ + z) * NL + s, j, mask=m)


@triton.jit
def _in_interval_t(qi, lo, n):
    """[BS, BM] ``lo_s <= qi < lo_s + n_s``: ``common.in_interval`` for the transposed tiles (one
    unsigned compare per element)."""
    return (qi[None, :] - lo[:, None]).to(tl.uint32, bitcast=True) < n[:, None].to(tl.uint32, bitcast=True)


@triton.jit
def _flush(DK, DV, DU, rows, m, acc_k, acc_v, acc_u, scale,
           D: tl.constexpr, DV_: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    """DK[rows] += acc_k * scale, DV[rows] += acc_v, DU[rows] += acc_u where m [BS] (rows int64:
    ``r * S + pair``). Plain read-add-write: the caller owns these rows."""
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    mk = m[:, None] & (offs_d[None, :] < D)
    pk = DK + rows[:, None] * D + offs_d[None, :]
    tl.store(pk, tl.load(pk, mask=mk, other=0.0) + acc_k * scale, mask=mk)
    mv = m[:, None] & (offs_dv[None, :] < DV_)
    pv = DV + rows[:, None] * DV_ + offs_dv[None, :]
    tl.store(pv, tl.load(pv, mask=mv, other=0.0) + acc_v, mask=mv)
    tl.store(DU + rows, tl.load(DU + rows, mask=m, other=0.0) + acc_u, mask=m)


@triton.jit
def _slot_rows(K, V, EVICT, U, FRAC, b, h, r64, cur, m, S,
               skb, skh, sks, skd, svb, svh, svs, svd,
               D: tl.constexpr, DV_: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    """For the pairs ``cur`` [BS] where m: key [BS, BD], value [BS, BDV], evict, score (float64)
    and fractional range (lo, hi); zeros elsewhere."""
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    j64 = tl.where(m, cur, 0).to(tl.int64)
    k = tl.load(K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + j64[:, None] * sks + offs_d[None, :] * skd,
                mask=m[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + j64[:, None] * svs + offs_dv[None, :] * svd,
                mask=m[:, None] & (offs_dv[None, :] < DV_), other=0.0)
    row = r64 * S + j64
    ev = tl.load(EVICT + row, mask=m, other=0)  # clamped to S by the caller
    uj = tl.load(U + row, mask=m, other=0.0)
    f0 = tl.load(FRAC + row * 2, mask=m, other=0)
    f1 = tl.load(FRAC + row * 2 + 1, mask=m, other=0)
    return k, v, ev, uj, f0, f1


@triton.jit
def _sweep_block(Q, DO, LSE, SHIFT, TAU, k, v, uj, f0, f1, cur, ev, acc_k, acc_v, acc_u, qb, b, h, r64,
                 sqb, sqh, sqs, sqd, sdb, sdh, sds, sdd, S, Hq, window, scale,
                 G: tl.constexpr, D: tl.constexpr, DV_: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                 BM: tl.constexpr, PRECISION: tl.constexpr, ENTRY: tl.constexpr):
    """One query block of ``_bwd_slot_sweep``: adds its part to the slots' sums acc_k [BS, BD],
    acc_v [BS, BDV], acc_u [BS] and returns them."""
    BMQ: tl.constexpr = BM // G
    qs = qb * BMQ
    # Slot s serves the queries [lo_s, lo_s + n_s): from its pair's entry (before this
    # block, except for ENTRY's pairs entering in it) to its eviction (clamped to S).
    if ENTRY:
        lo = cur + window
        n = tl.where((cur >= 0) & (lo // BMQ == qb), ev - lo, 0)
    else:
        lo = tl.where(cur >= 0, cur + window, qs)
        n = tl.where((cur >= 0) & (lo < qs), ev - lo, 0)
    qi, g, real = tile_rows(qb, S, BM, G)
    q, do, lse, sh = load_rows(Q, DO, LSE, SHIFT, b, h, qi, g, real, Hq, S,
                               sqb, sqh, sqs, sqd, sdb, sdh, sds, sdd, G, D, DV_, BD, BDV)
    qi = tl.where(real, qi, S)  # padding rows select nothing (n ends by S)
    shift32 = block_shift32(TAU + r64 * S, qb, S, BMQ)
    tau_s = (tl.load(TAU + r64 * S + tl.minimum(qi, S - 1)) - shift32.to(tl.float64)).to(tl.float32)
    u_s = (uj - shift32.to(tl.float64)).to(tl.float32)
    # Per slot, T_i ∩ F_i is one interval of queries, [max(lo, f0), min(lo + n, f1)): one
    # compare per score, like the selection's.
    f_lo = tl.maximum(lo, f0)
    f_n = tl.maximum(tl.minimum(lo + n, f1) - f_lo, 0)
    # Base 2 as the other kernels (q.k scaled by scale * log2(e) once, lse in base 2: exp2 is one
    # instruction, exp a multiply, the instruction and a range fix-up). Weights, exponentials and
    # t are computed unmasked (p is finite everywhere, NaN scores read as 0); the two products
    # the dots take are selected, so a score off the selection adds an exact 0 whatever its
    # exponential (inf or NaN there on a poisoned row: lse, shift NaN), and a poisoned row still
    # gives NaN exactly where it selects. (A mask on p, a and t each: 4 selects per score.)
    pT = clip01_num(u_s[:, None] - tau_s[None, :])
    qk2T = tl.dot(k, tl.trans(q), input_precision=PRECISION) * (scale * 1.4426950408889634)
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    aT = tl.exp2(qk2T * pT - (lse * 1.4426950408889634)[None, :])
    tT = aT * (dpT * pT + sh[None, :])
    selT = _in_interval_t(qi, lo, n)
    acc_v += tl.dot(tl.where(selT, aT * pT, 0.0).to(do.dtype), do, input_precision=PRECISION)
    acc_k += tl.dot(tl.where(selT, tT * pT, 0.0).to(q.dtype), q, input_precision=PRECISION)
    # dL/dp = a dp + qk a (p dp + shift) on T_i ∩ F_i (F by the ranges of FRAC, as |F_i|);
    # float32 over the block's rows, float64 across blocks
    frT = _in_interval_t(qi, f_lo, f_n)
    acc_u += tl.sum(tl.where(frT, aT * dpT + (qk2T * 0.6931471805599453) * tT, 0.0), 1).to(tl.float64)
    return acc_k, acc_v, acc_u


@triton.jit
def _bwd_slot_sweep(
    Q, K, V, DO, LSE, SHIFT, U, TAU, EVICT, FRAC, LANES, DK, DV, DU, CK, CV, CU,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
    S, NL, NZ, SEGB, Hq, Hkv, window, scale,
    G: tl.constexpr, D: tl.constexpr, DV_: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BS: tl.constexpr, PRECISION: tl.constexpr, ENTRY: tl.constexpr,
):
    """Adds the selected pairs' dk (times scale), dv and du's first term from the query blocks
    *after* the block each pair enters in (ENTRY: from that block alone; then the lanes are BS
    consecutive positions, one segment, and every pair is flushed at the end) into DK [R, S, D],
    DV [R, S, DV] (float32) and DU [R, S] (float64) for the pairs evicted within the segment,
    and parks the sums of the pairs still in their slots at its end in CK [R, NZ-1, NL, D],
    CV [R, NZ-1, NL, DV], CU [R, NZ-1, NL] (segments but the last).

    So a slot's pair changes only between query blocks: in block [qs, qe) slot s works for the
    pair that entered before qs and is evicted after it, if any, and the tile is one dense pass.
    Tiles are transposed (slots x query rows, as FlexAttention's key-side loop) so that the dk,
    dv dots take them as they are. Per score, the query kernel's float32 arithmetic: weights
    from scores and thresholds shifted by a float32 block constant (``weights32``), one
    unsigned compare per interval (``in_interval``)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    BMQ: tl.constexpr = BM // G
    NT = tl.cdiv(NL, BS)
    t = pid % NT
    z = pid // NT
    r64 = (b * Hkv + h).to(tl.int64)
    lane = t * BS + tl.arange(0, BS)
    lane_ok = lane < NL
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    if ENTRY:
        cur = tl.where(lane < S, lane, -1)
    else:
        cur = tl.load(LANES + (r64 * NZ + z) * NL + lane, mask=lane_ok, other=-1)
    # Per slot: its pair's key and value (kept across blocks: reloaded only when the slot
    # changes, so the loop streams q and do alone, as FlashAttention's key-side loop),
    # eviction, score and fractional range.
    k, v, ev, uj, f0, f1 = _slot_rows(K, V, EVICT, U, FRAC, b, h, r64, cur, cur >= 0, S,
                                      skb, skh, sks, skd, svb, svh, svs, svd, D, DV_, BD, BDV)
    acc_k = tl.zeros([BS, BD], tl.float32)
    acc_v = tl.zeros([BS, BDV], tl.float32)
    acc_u = tl.zeros([BS], tl.float64)
    if ENTRY:
        cur = tl.where(ev > cur + window, cur, -1)  # pairs ever selected
        qb0 = (t * BS + window) // BMQ
        qb1 = tl.minimum((t * BS + BS - 1 + window) // BMQ + 1, tl.cdiv(S, BMQ))
    else:
        # Blocks before any slot's pair has entered have nothing to do.
        qb0 = tl.maximum(z * SEGB, tl.min(tl.where(cur >= 0, cur + window, S), 0) // BMQ + 1)
        qb1 = tl.minimum(z * SEGB + SEGB, tl.cdiv(S, BMQ))
    # The first query at which some slot's pair is complete. The blocks run in stretches with no
    # slot change: the change handling sits between them, so the inner loop has no branch and
    # its loads pipeline (with the test inside it, the sweep took 18% longer).
    next_end = tl.min(tl.where(cur >= 0, ev, S), 0)
    qb = qb0
    while qb < qb1:
        qs = qb * BMQ
        if (not ENTRY) and next_end <= qs:
            # Pairs evicted by qs are complete: flush them, then follow each slot's chain to the
            # pair that holds it at qs (pairs entering and leaving within one block have no part).
            ended = (cur >= 0) & (ev <= qs)
            _flush(DK, DV, DU, r64 * S + tl.maximum(cur, 0).to(tl.int64), ended, acc_k, acc_v, acc_u, scale,
                   D, DV_, BD, BDV)
            acc_k = tl.where(ended[:, None], 0.0, acc_k)
            acc_v = tl.where(ended[:, None], 0.0, acc_v)
            acc_u = tl.where(ended, 0.0, acc_u)
            changed = ended
            while tl.max(ended.to(tl.int32), 0) > 0:
                # the newcomer that evicts pair j is ev - window; nxt > j for every real
                # eviction, and the test keeps the walk finite whatever EVICT holds
                nxt = ev - window
                cur = tl.where(ended, tl.where((ev < S) & (nxt > cur), nxt, -1), cur)
                ev = tl.where(ended, tl.load(EVICT + r64 * S + tl.maximum(cur, 0), mask=ended & (cur >= 0), other=0), ev)
                ended = (cur >= 0) & (ev <= qs)
            kn, vn, evn, un, f0n, f1n = _slot_rows(K, V, EVICT, U, FRAC, b, h, r64, cur, changed & (cur >= 0), S,
                                                   skb, skh, sks, skd, svb, svh, svs, svd, D, DV_, BD, BDV)
            k = tl.where(changed[:, None], kn, k)
            v = tl.where(changed[:, None], vn, v)
            uj = tl.where(changed, un, uj)
            f0 = tl.where(changed, f0n, f0)
            f1 = tl.where(changed, f1n, f1)
            next_end = tl.min(tl.where(cur >= 0, ev, S), 0)
        if ENTRY:
            nb = qb1
        else:
            nb = tl.minimum(qb1, tl.maximum(tl.cdiv(next_end, BMQ), qb + 1))
        for qb2 in range(qb, nb):
            acc_k, acc_v, acc_u = _sweep_block(
                Q, DO, LSE, SHIFT, TAU, k, v, uj, f0, f1, cur, ev, acc_k, acc_v, acc_u, qb2, b, h, r64,
                sqb, sqh, sqs, sqd, sdb, sdh, sds, sdd, S, Hq, window, scale,
                G, D, DV_, BD, BDV, BM, PRECISION, ENTRY)
        qb = nb
    # Segment end: pairs evicted by its end are complete, the others' sums are parked.
    zb = tl.minimum(qb1 * BMQ, S)
    ended = (cur >= 0) & ((ev <= zb) | ENTRY)
    _flush(DK, DV, DU, r64 * S + tl.maximum(cur, 0).to(tl.int64), ended, acc_k, acc_v, acc_u, scale,
           D, DV_, BD, BDV)
    if not ENTRY and z < NZ - 1:
        c64 = r64 * (NZ - 1) + z
        rows = (c64 * NL + lane).to(tl.int64)
        keep = lane_ok & ~ended
        tl.store(CK + rows[:, None] * D + offs_d[None, :], tl.where(keep[:, None], acc_k * scale, 0.0),
                 mask=lane_ok[:, None] & (offs_d[None, :] < D))
        tl.store(CV + rows[:, None] * DV_ + offs_dv[None, :], tl.where(keep[:, None], acc_v, 0.0),
                 mask=lane_ok[:, None] & (offs_dv[None, :] < DV_))
        tl.store(CU + rows, tl.where(keep, acc_u, 0.0), mask=lane_ok)


@triton.jit
def _add_carries(LANES, DK, DV, DU, CK, CV, CU, S, NL, NZ, Hkv,
                 D: tl.constexpr, DV_: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                 BS: tl.constexpr):
    """Adds the sums parked at the end of segment z (z = 0 .. NZ-2, in order) to the pairs that
    hold the slots at the start of segment z + 1."""
    t = tl.program_id(0)
    r64 = (tl.program_id(2) * Hkv + tl.program_id(1)).to(tl.int64)
    lane = t * BS + tl.arange(0, BS)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    for z in range(0, NZ - 1):
        j = tl.load(LANES + (r64 * NZ + z + 1) * NL + lane, mask=lane < NL, other=-1)
        ok = j >= 0
        rows = ((r64 * (NZ - 1) + z) * NL + lane).to(tl.int64)
        ck = tl.load(CK + rows[:, None] * D + offs_d[None, :], mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
        cv = tl.load(CV + rows[:, None] * DV_ + offs_dv[None, :], mask=ok[:, None] & (offs_dv[None, :] < DV_),
                     other=0.0)
        cu = tl.load(CU + rows, mask=ok, other=0.0)
        # parked dk sums are already scaled
        _flush(DK, DV, DU, r64 * S + tl.where(ok, j, 0).to(tl.int64), ok, ck, cv, cu, 1.0, D, DV_, BD, BDV)


def add_selected_grads(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, lse32: Tensor, shift: Tensor,
                       u64: Tensor, tau: Tensor, evict: Tensor, frac: Tensor, dk: Tensor, dv: Tensor, du: Tensor,
                       topk: int, window: int, scale: float, meta: dict, n_segments: int | None = None) -> None:
    """Adds the selected pairs' dk, dv and du's first term into dk [R, S, D], dv [R, S, DV]
    (float32) and du [R, S] (float64), in place. q [B, Hq, S, D], k, v, grad_out as the
    backward's (any strides); lse32, shift [B, Hq, S] float32; u64, tau [R, S] float64; evict
    [R, S] int32 clamped to S; frac [R, S, 2] int32, the ranges of ``fractional_ranges``.
    ``meta``: the backward's tile constants (G, D, DV_, BD, BDV, BM, PRECISION); BM // G is the
    query block that decides a pair's entry block. ``n_segments`` forces the number of query
    segments (tests)."""
    B, Hq, S, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    R = B * Hkv
    slot, NL = slot_of(evict, topk, window)
    if NL == 0:
        return
    dev = q.device
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    none = torch.zeros(1, dtype=torch.int32, device=dev)
    BM, G = meta["BM"], meta["G"]
    BS = SLOTS_PER_TILE if max(meta["BD"], meta["BDV"]) <= 128 else 16
    BMQ = BM // G
    NBQ = -(-S // BMQ)
    SEGB = segments(NL, R, NBQ, BS, q.device, n_segments)
    NZ = -(-NBQ // SEGB)
    NT = -(-NL // BS)
    launch = dict(meta, BS=BS, num_warps=SWEEP_WARPS, num_stages=SWEEP_STAGES)
    if SWEEP_MAXNREG is not None:
        launch["maxnreg"] = SWEEP_MAXNREG
    # Each pair's entry block, over consecutive positions (no slots needed there).
    _bwd_slot_sweep[(-(-S // BS), Hkv, B)](
        q, k, v, grad_out, lse32, shift, u64, tau, evict, frac, none, dk, dv, du, dk, dv, du, *strides,
        S, S, 1, NBQ, Hq, Hkv, window, scale, ENTRY=True, **launch)
    lanes = torch.full((R, NZ, NL), -1, dtype=torch.int32, device=dev)
    BLOCK = 1024
    _segment_lanes[(-(-S // BLOCK), NZ, R)](evict, slot, lanes, S, NL, NZ, SEGB * BMQ, topk, window, BLOCK=BLOCK)
    nc = max(1, R * (NZ - 1) * NL)
    ck = torch.empty(nc, D, dtype=torch.float32, device=dev)
    cv = torch.empty(nc, Dv, dtype=torch.float32, device=dev)
    cu = torch.empty(nc, dtype=torch.float64, device=dev)
    _bwd_slot_sweep[(NT * NZ, Hkv, B)](
        q, k, v, grad_out, lse32, shift, u64, tau, evict, frac, lanes, dk, dv, du, ck, cv, cu, *strides,
        S, NL, NZ, SEGB, Hq, Hkv, window, scale, ENTRY=False, **launch)
    if NZ > 1:
        _add_carries[(NT, Hkv, B)](lanes, dk, dv, du, ck, cv, cu, S, NL, NZ, Hkv,
                                    D=meta["D"], DV_=meta["DV_"], BD=meta["BD"], BDV=meta["BDV"],
                                    BS=BS)
