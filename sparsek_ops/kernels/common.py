"""Triton math shared by the forward and backward kernels: one source of truth for the tile
layout, the masks and the weights (DESIGN.md section 2).

Tile layout (GQA): a program owns one KV head ``h`` and a block of ``BMQ = BM // G`` consecutive
queries, and its ``BM`` tile rows are those queries for all ``G`` query heads of ``h``'s group,
row ``m`` = (query ``i0 + m // G``, query head ``h * G + m % G``). The selection of a query
depends only on its KV head, so the keys a block gathers once serve all ``G`` heads (issue 3:
"the G query heads of a GQA group processed together"). Rows ``m >= BMQ * G`` (when G is not a
power of two) and queries ``>= S`` are padding.

Weights: ``p_ij = clip(u_j - tau_i, 0, 1)`` for selected pairs. Scores and thresholds are
float64; both are shifted by one per-block constant (the block's first finite tau) before the
subtraction is done in float32, so large scores keep their precision (a score of 1e6 and a
threshold of 1e6 - 0.5 give exactly 0.5).
"""

from __future__ import annotations

import triton
import triton.language as tl


def rows_per_tile(block_m: int, G: int) -> int:
    """Tile rows for ``block_m`` requested rows and group size G: a power of two >= G."""
    return max(block_m, triton.next_power_of_2(G))


def dot_width(d: int) -> int:
    """A head dim's tile width: a power of two >= 16 (``tl.dot`` needs 16), padded lanes masked."""
    return max(16, triton.next_power_of_2(d))


def queries_per_block(rows: int, G: int) -> int:
    """Queries per block (and the selection's ``block_m``) for a tile of ``rows`` rows."""
    return rows // G


@triton.jit
def tile_rows(pid_m, S, BM: tl.constexpr, G: tl.constexpr):
    """Rows of query block ``pid_m``: query position [BM], head within the group [BM], and
    whether the row is real [BM]."""
    BMQ: tl.constexpr = BM // G
    m = tl.arange(0, BM)
    qi = pid_m * BMQ + m // G
    g = m % G
    real = (m < BMQ * G) & (qi < S)
    return qi, g, real


@triton.jit
def block_shift(TAU_ROW, pid_m, S, BMQ: tl.constexpr):
    """The per-block float64 constant subtracted from scores and thresholds: the block's first
    tau, or 0 where it is -inf (everything kept) or NaN (poisoned)."""
    shift = tl.load(TAU_ROW + tl.minimum(pid_m * BMQ, S - 1))
    shift = tl.where(shift == shift, shift, 0.0)
    return tl.where(shift == float("-inf"), 0.0, shift)


@triton.jit
def clip01(x):
    """clip(x, 0, 1) that keeps NaN, so a poisoned query comes out NaN; x = +inf gives 1.
    (NaN-propagating max/min: two instructions on the GPU, no select.)"""
    return tl.minimum(tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def load_rows(Q, DO, LSE, SHIFT, b, h, qi, g, real, Hq, S,
               sqb, sqh, sqs, sqd, sdb, sdh, sds, sdd,
               G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    """q [BM, BD] and do [BM, BDV] (input dtype), lse and shift [BM] (float32) of the tile rows
    (query qi, head h * G + g). Padding rows read zeros; every use of them is masked."""
    hq = (h * G + g).to(tl.int64)
    qc = tl.minimum(qi, S - 1).to(tl.int64)
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q = tl.load(Q + b64 * sqb + hq[:, None] * sqh + qc[:, None] * sqs + offs_d[None, :] * sqd,
                mask=real[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b64 * sdb + hq[:, None] * sdh + qc[:, None] * sds + offs_dv[None, :] * sdd,
                 mask=real[:, None] & (offs_dv[None, :] < DV), other=0.0)
    row = (b64 * Hq + hq) * S + qc
    lse = tl.load(LSE + row, mask=real, other=0.0)
    sh = tl.load(SHIFT + row, mask=real, other=0.0)
    return q, do, lse, sh


# ------------------------------------------------------------------ float32 weights, interval masks, softmax steps
@triton.jit
def block_shift32(TAU_ROW, pid_m, S, BMQ: tl.constexpr):
    """``block_shift`` rounded to a float32 value. Scores near a float32 shift subtract from it
    exactly in float32 (Sterbenz), so the keys of a tile need no float64 at all; only the
    thresholds take ``tau_i - shift`` in float64, once per row."""
    return block_shift(TAU_ROW, pid_m, S, BMQ).to(tl.float32)


@triton.jit
def clip01_num(x):
    """clip(x, 0, 1) with NaN -> 0 (max/min that drop NaN; after a subtraction, as in
    ``weights32``, the GPU does all three in one saturating add, FADD.SAT). For tiles whose
    poisoned rows (tau = NaN) the caller overwrites with NaN itself (forward: at the end): every
    weight stays finite, so a masked entry's ``e * p`` is 0 even next to a non-finite score."""
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def weights32(u_s, tau_s):
    """[BM, BN] float32 ``clip(u_j - tau_i, 0, 1)`` from shifted scores u_s [BN] (``u_j - shift``,
    float32) and thresholds tau_s [BM] (``tau_i - shift``). tau = -inf gives 1, NaN anywhere 0
    (``clip01_num``)."""
    return clip01_num(u_s[None, :] - tau_s[:, None])


@triton.jit
def list_entries(jr, ok, window):
    """Gather-list entries jr [BN] (int32, -1 for padding; ``ok`` [BN] false for entries read
    past the list's end) as (position j [BN], lo [BN]): j clamped to 0 for padding (a real row
    to read), and lo the first query that selects the pair, ``j + window``, or -2^30 for
    padding, so that no query falls in its interval ``[lo, lo + n)`` (``key_intervals``:
    n <= S) and ``covers_block`` is false.

    Integers, not a boolean "real" mask: the pipelined loops carry these from the list's stage
    to the loads' and the scores', and sm_90 builds kept carried boolean masks as bits of
    general registers, three instructions to set and test each (bench/sm90_build.py; the
    query kernel's selected loop went from 1012 to 722 instructions per chunk with this and its
    mask changes)."""
    return tl.maximum(jr, 0), tl.where((jr >= 0) & ok, jr + window, -(1 << 30))


@triton.jit
def key_intervals(j, evict_j, window):
    """n [BN]: pair j is selected by the queries ``lo <= i < lo + n`` (int32; ``lo`` of
    ``list_entries``, ``n = evict[j] - j - window``, clamped at 0; ``selection.eviction``), for
    ``in_interval`` and ``covers_block``."""
    return tl.maximum(evict_j - j - window, 0)


@triton.jit
def in_interval(qi, lo, n):
    """[BM, BN] ``lo_j <= qi < lo_j + n_j`` in one unsigned compare per element (two signed
    compares become two selects each on the GPU)."""
    return (qi[:, None] - lo[None, :]).to(tl.uint32, bitcast=True) < n[None, :].to(tl.uint32, bitcast=True)


@triton.jit
def in_window_u32(pos, qi, window):
    """[BM, BN] mask: position pos is in the window of query qi, ``qi - window < pos <= qi``, in
    one unsigned compare (pos > qi wraps around to a large difference). No "real" terms: a
    position >= S is past every query < S, and a row the caller must exclude can sit at qi =
    2^30, past every window."""
    return (qi[:, None] - pos[None, :]).to(tl.uint32, bitcast=True) < window


@triton.jit
def covers_block(lo, n, i0, i1):
    """Scalar: every query of ``[i0, i1)`` selects every slot of the tile (``key_intervals``; a
    padding slot never does), so the tile needs no mask."""
    return tl.min(((lo <= i0) & (lo + n >= i1)).to(tl.int32), 0)


@triton.jit
def list_bound(LIST_ROW, L, NSAMP: tl.constexpr):
    """An upper bound on the length n of a gather list (ascending, padded with -1 at the end) of
    capacity L, from NSAMP evenly spaced entries in one vector load: with stride
    ``c = ceil(L / NSAMP)``, the number of real samples is ``ceil(n / c)``, so the bound is
    below ``n + c``. Loops over the list stop there instead of at L."""
    c = (L + NSAMP - 1) // NSAMP
    t = tl.arange(0, NSAMP) * c
    x = tl.load(LIST_ROW + t, mask=t < L, other=-1)
    return tl.minimum(tl.sum((x >= 0).to(tl.int32), 0) * c, L)


@triton.jit
def window_parts(i0, BMQ: tl.constexpr, S, window, BN: tl.constexpr):
    """The window span of queries ``[i0, i0 + BMQ)``, positions ``[a, d)`` with
    ``a = max(0, i0 - window + 1)``, ``d = min(i0 + BMQ, S)``, cut in BN-chunks: ``[a, b)`` and
    ``[c, d)`` need the ``in_window_u32`` mask, the chunks of ``[b, c)`` are seen by every query of the
    block (``i0 + BMQ - window <= pos <= i0``, all in ``[0, S)``) and need none. ``[a, b)`` may run
    past d (its keys are masked there). window >= 1."""
    a = tl.maximum(i0 - window + 1, 0)
    d = tl.minimum(i0 + BMQ, S)
    f0 = tl.minimum(tl.maximum(i0 + BMQ - window, 0), d)  # first key every query sees
    b = a + ((f0 - a + BN - 1) // BN) * BN
    c = b + (tl.maximum(i0 + 1 - b, 0) // BN) * BN
    return a, b, c, d


@triton.jit
def softmax_step_exp2(m_i, l_i, acc, s, w, v, PRECISION: tl.constexpr):
    """One step of the online softmax over a tile of base-2 logits s [BM, BN] (s = log2(e) *
    scale * p * q.k, the caller folds log2(e) into q; -inf: not attended): the running max m_i,
    sum l_i and output acc, with the weights multiplied by w (p, or 1) before they meet the values
    v [BN, DV]; exp2 is one instruction on the GPU, and the rescaled acc is the dot's accumulator."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    e = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(e, 1)
    acc = tl.dot((e * w).to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def softmax_step_exp2_lazy(m_i, l_i, acc, s, w, v, PRECISION: tl.constexpr):
    """``softmax_step_exp2`` with lazy rescaling (as FlashAttention-4): the reference max m_i of
    the rows is raised, and acc and l rescaled, only when some row's max grew by more than 8
    (a factor 2^8 in the exponentials, harmless in float32 and in the bf16/fp16 weights) -- in
    practice in the first chunks only, so the usual per-chunk ``acc * alpha`` (one multiply per
    acc element) goes. The test is one scalar for the whole tile. ``lse = m_i + log2(l)`` holds
    as with the eager version."""
    m_blk = tl.max(s, 1)
    if tl.max((m_blk > m_i + 8.0).to(tl.int32), 0) > 0:  # -inf + 8 = -inf: a row's first keys count
        m_new = tl.maximum(m_i, m_blk)
        alpha = tl.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))
        l_i = l_i * alpha
        acc = acc * alpha[:, None]
        m_i = m_new
    e = tl.exp2(s - tl.where(m_i == float("-inf"), 0.0, m_i)[:, None])
    l_i = l_i + tl.sum(e, 1)
    acc = tl.dot((e * w).to(v.dtype), v, acc, input_precision=PRECISION)
    return m_i, l_i, acc
