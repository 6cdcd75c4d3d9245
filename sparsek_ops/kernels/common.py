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
    """clip(x, 0, 1) that keeps NaN, so a poisoned query comes out NaN; x = +inf gives 1."""
    return tl.where(x != x, x, tl.minimum(tl.maximum(x, 0.0), 1.0))


@triton.jit
def selected(j, real_j, evict_j, qi, window):
    """[BM, BN] mask: pair j is selected by query qi iff ``j + window <= qi < evict[j]``
    (selection.eviction)."""
    return real_j[None, :] & (j[None, :] + window <= qi[:, None]) & (qi[:, None] < evict_j[None, :])


@triton.jit
def in_window(pos, real_pos, qi, window):
    """[BM, BN] mask: position pos is in the window of query qi, ``qi - window < pos <= qi``."""
    return real_pos[None, :] & (pos[None, :] <= qi[:, None]) & (pos[None, :] > qi[:, None] - window)


@triton.jit
def softmax_step(m_i, l_i, acc, s, w, v, PRECISION: tl.constexpr):
    """One step of the online softmax over a tile of logits s [BM, BN] (-inf: not attended):
    the running max m_i, sum l_i and output acc, with the weights multiplied by w (p, or 1)
    before they meet the values v [BN, DV]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    e = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(e, 1)
    acc = acc * alpha[:, None] + tl.dot((e * w).to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def pair_weights(u_j, tau_i, shift):
    """[BM, BN] float32 weights ``clip(u_j - tau_i, 0, 1)`` from float64 scores u_j [BN] and
    thresholds tau_i [BM], both shifted by the block constant (block_shift) first. tau = -inf
    (every candidate kept) gives 1."""
    u_s = (u_j - shift).to(tl.float32)
    tau_s = (tau_i - shift).to(tl.float32)
    return clip01(u_s[None, :] - tau_s[:, None])


@triton.jit
def fractional(u_j, tau_i):
    """[BM, BN] ``tau_i < u_j < tau_i + 1`` in float64: the very test of
    ``selection.prefix_fractional_counts``, so |F_i| and the pairs in F_i always agree."""
    return (u_j[None, :] > tau_i[:, None]) & (u_j[None, :] < tau_i[:, None] + 1.0)
