"""GPU selection: ``selection.select``'s results from Triton kernels, with no host sync.

The PyTorch selection (``sparsek_ops/selection.py``) finds every prefix's threshold with a
parallel binary search: O(S log S) work, but dozens of small kernels per search step, which on
a GPU costs milliseconds in launches and row scans. Here the prefixes are *walked*, which is
what decoding does, in many chunks at once:

* The row is cut into chunks of consecutive prefix lengths n (``chunk_starts``: short chunks
  early, where nearly every new pair changes the selection, longer ones later, where most new
  pairs fall below the threshold and change nothing).
* ``_chunk_start`` (one program per chunk) solves the chunk's first prefix from scratch:
  the k-th best rank ``K(n)`` (pair j is in the top-k iff ``rank_j <= K(n)``) and ``tau(n)``,
  each by a multi-pivot search (tau's over the sorted breakpoints, every ``u`` and ``u - 1``;
  the same set and the same bracket rule as ``prefix_threshold``). Each pass asks counts and
  sums over the first n positions, answered by binary searches in blocks of positions sorted
  once per row (``_rank_counts``, ``_above``), so a pass costs about log2(block) dependent
  loads, not a scan of n scores.
* ``_walk`` (one warp per chunk) then adds the chunk's pairs one by one. A pair below the
  threshold that does not enter the top-k changes nothing (facts 1, 2): a whole tile of such
  pairs is skipped with vector tests. A live pair updates the top-k (evicting the worst pair,
  whose eviction index is written here, fact 2) and moves the threshold right along the sorted
  breakpoints, crossing whole runs of equal breakpoints at a time, with the counts and sums of
  the linear piece kept up to date (f = sum clip(u - t, 0, 1) is linear between breakpoints).
* ``_block_lists`` (one program per query block) writes each block's gather list:
  the top-k of its first prefix (the positions of rank <= K(n), found in rank order) followed by
  the block's newcomers that enter the top-k (fact 3: at most topk + block_m pairs).

Everything is exact: the same thresholds as ``prefix_threshold`` up to float64 rounding (the
sums are formed in another order), the same eviction indices and the same sets per block.
Differences from ``selection.select``: gather lists are in rank order (best first) and then
position order, not ascending; ``evict`` and ``block_index`` are int32. ``|F|`` (backward only)
comes from sorts and searchsorted (``fractional_counts``): no syncs, no scatters.

Cost: one sort of the scores and one of every block of positions, O(S log S) to merge the
breakpoints, O((a0 / block) log(block) + block) per pass of a chunk start (about
(k/live)(1 + 3 ln(S/k)) chunks per row), and per chunk about ``live``
(``live_per_chunk``) live pairs of a few dependent memory round trips each. Measured numbers:
bench/NOTES.md ("GPU selection").
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..projection import F_SLACK
from .. import selection as torch_selection
from ..selection import Selection, candidate_counts

# Chunking: about `live` pairs that change the selection per chunk, with the rough model "a pair
# at prefix n is live with probability min(1, LIVE_RATE * k / n)". Short chunks shorten the walk
# (a chain of dependent steps per live pair) and add chunk starts; the best length depends on
# how many rows share the GPU, so it is the longest of LIVE_LADDER that still gives about
# WALK_PROGRAMS programs (chunks x rows), and the shortest rung where none does (``live_per_chunk``;
# measured on the H100, bench/NOTES.md session 10). LIVE_PER_CHUNK, when set, overrides it.
LIVE_PER_CHUNK: int | None = None
LIVE_LADDER = (32, 48, 64, 80, 96, 112, 128, 192, 256)
WALK_PROGRAMS = 2000
LIVE_RATE = 3.0
MAX_CHUNK = 4096
PIVOTS = 8  # breakpoints tried per pass of the start search (passes ~ log_9(2S))
START_BLOCK, START_WARPS = 512, 4  # chunk starts: positions per sorted block, warps
START_GROUP = 64  # blocks searched at once by a chunk start
# Rows of START_LONG_FROM or more: blocks of START_LONG_BLOCK, START_LONG_GROUP at once (about
# 10-20% off the chunk starts at 64K and 128K on the H100; shorter rows preferred 512 / 64).
START_LONG_FROM, START_LONG_BLOCK, START_LONG_GROUP = 65536, 1024, 32
# The walk: prefixes (and breakpoints, ranks) per tile, and warps per chunk. One warp and 32 are
# the sizes every measurement so far used; bench/gpu_selection.py --walk TB:WARPS tries others.
WALK_TB, WALK_WARPS = 32, 1
# Rows this long or longer sort as one flat tensor (rank_order): PyTorch sorts rows of up to
# 4096 in place, one block per row, faster than a flat sort there (measured on the H100).
FLAT_SORT_FROM = 4097


@functools.lru_cache(maxsize=256)
def _chunk_starts(S: int, k: int, live: int) -> tuple[int, ...]:
    """First prefix length of every chunk (about ``live`` live pairs each), covering n = 0 .. S.
    ``k + 1`` is always a start, so the first finite threshold is solved from scratch, never
    walked into."""
    starts = [0]
    a = 0
    while a <= S:
        if a <= k:
            nxt = min(a + live, k + 1)
        else:
            nxt = a + min(MAX_CHUNK, max(live, int(live * a / (LIVE_RATE * k))))
        if nxt <= S:
            starts.append(nxt)
        a = nxt
    return tuple(starts)


def live_per_chunk(S: int, k: int, rows: int) -> int:
    """Live pairs per chunk for ``rows`` rows of length S: LIVE_PER_CHUNK if set, else the
    longest rung of LIVE_LADDER with at least WALK_PROGRAMS programs, else the shortest."""
    if LIVE_PER_CHUNK is not None:
        return LIVE_PER_CHUNK
    fits = [n for n in LIVE_LADDER if rows * (len(_chunk_starts(S, k, n)) - 1) >= WALK_PROGRAMS]
    return max(fits) if fits else min(LIVE_LADDER)


@functools.lru_cache(maxsize=64)
def chunk_starts(S: int, k: int, live: int, device: torch.device) -> Tensor:
    """[NC + 1] int32: chunk starts and S + 1 at the end. Cached per device, so that later calls
    copy nothing from the host (and can be captured in a CUDA graph)."""
    return torch.tensor(list(_chunk_starts(S, k, live)) + [S + 1], dtype=torch.int32, device=device)


# S = 1 specialised to a constant broke triton 3.6's coalescing pass (PassManager::run failed).
@triton.jit(do_not_specialize=["S"])
def _prepare(
    VALS, PS, RANK, BVAL, BPOS, BTYP, BU, IU, IV, IUR, IVR,
    S, BLK: tl.constexpr, STEPS: tl.constexpr,
):
    """From the scores in rank order (VALS descending, PS their positions): every position's rank
    (RANK), and the sorted breakpoints (every u and u - 1, ascending; ties put u - 1 first) as a
    merge of the two sorted sequences, with no second sort. Breakpoint e: value BVAL, position
    BPOS, type BTYP (1: u, 0: u - 1), score BU; each position's two breakpoint indices IU, IV
    (and by rank IUR, IVR)."""
    pid = tl.program_id(0)
    r = tl.program_id(1)
    i = pid * BLK + tl.arange(0, BLK)  # ascending index: A[i] = VALS[S - 1 - i]
    ok = i < S
    rr = S - 1 - i
    vals = VALS + r * S
    a = tl.load(vals + rr, mask=ok, other=0.0)
    pos = tl.load(PS + r * S + rr, mask=ok, other=0)
    am1 = a - 1.0
    # cu = #{j : A[j] - 1 <= a}, cv = #{j : A[j] < a - 1}: binary searches over the ascending A.
    lo_u = tl.zeros([BLK], tl.int32)
    hi_u = tl.zeros([BLK], tl.int32) + S
    lo_v = tl.zeros([BLK], tl.int32)
    hi_v = tl.zeros([BLK], tl.int32) + S
    for _ in tl.static_range(STEPS):
        mu = (lo_u + hi_u) // 2
        xu = tl.load(vals + (S - 1 - mu), mask=ok & (mu < S), other=0.0) - 1.0
        go_u = (mu < hi_u) & (xu <= a)
        lo_u = tl.where(go_u, mu + 1, lo_u)
        hi_u = tl.where(go_u | (mu >= hi_u), hi_u, mu)
        mv = (lo_v + hi_v) // 2
        xv = tl.load(vals + (S - 1 - mv), mask=ok & (mv < S), other=0.0)
        go_v = (mv < hi_v) & (xv < am1)
        lo_v = tl.where(go_v, mv + 1, lo_v)
        hi_v = tl.where(go_v | (mv >= hi_v), hi_v, mv)
    eu = i + lo_u
    ev = i + lo_v
    P = 2 * S
    tl.store(RANK + r * S + pos, rr, mask=ok)
    tl.store(BVAL + r * P + eu, a, mask=ok)
    tl.store(BPOS + r * P + eu, pos, mask=ok)
    tl.store(BTYP + r * P + eu, tl.full([BLK], 1, tl.int32), mask=ok)
    tl.store(BU + r * P + eu, a, mask=ok)
    tl.store(BVAL + r * P + ev, am1, mask=ok)
    tl.store(BPOS + r * P + ev, pos, mask=ok)
    tl.store(BTYP + r * P + ev, tl.zeros([BLK], tl.int32), mask=ok)
    tl.store(BU + r * P + ev, a, mask=ok)
    tl.store(IU + r * S + pos, eu, mask=ok)
    tl.store(IV + r * S + pos, ev, mask=ok)
    tl.store(IUR + r * S + rr, eu, mask=ok)
    tl.store(IVR + r * S + rr, ev, mask=ok)


@triton.jit
def _rank_counts(SRANK, RANK, m, nfull, a0, PB: tl.constexpr, NBG: tl.constexpr, STEPS: tl.constexpr):
    """[M] int32: how many of the first a0 positions have rank <= m, for the M ranks m [M].

    The first ``nfull * PB`` positions by blocks of PB, each block's ranks sorted (SRANK: a
    binary search per (rank, block), NBG blocks at a time); the rest, fewer than PB positions,
    read directly (RANK)."""
    offs_b = tl.arange(0, NBG)
    cnt = tl.sum(tl.zeros_like(m[:, None] + offs_b[None, :]), 1)
    for g0 in range(0, nfull, NBG):
        b = g0 + offs_b
        okb = (b < nfull)[None, :]
        base = SRANK + b[None, :] * PB
        lo = tl.zeros_like(m[:, None] + offs_b[None, :])  # entries < lo are <= m
        hi = lo + PB  # entries >= hi are > m
        for _ in tl.static_range(STEPS):
            act = lo < hi
            mid = (lo + hi) // 2
            x = tl.load(base + tl.minimum(mid, PB - 1), mask=okb & act, other=0)
            le = x <= m[:, None]
            lo = tl.where(act & le, mid + 1, lo)
            hi = tl.where(act & ~le, mid, hi)
        cnt += tl.sum(tl.where(okb, lo, 0), 1)
    pos = nfull * PB + tl.arange(0, PB)
    rk = tl.load(RANK + pos, mask=pos < a0, other=2147483647)
    return cnt + tl.sum((rk[:, None] <= m[None, :]).to(tl.int32), 0)


@triton.jit
def _next_rank(SRANK, RANK, K, nfull, a0, PB: tl.constexpr, NBG: tl.constexpr, STEPS: tl.constexpr):
    """The smallest rank above K among the first a0 positions (2**31 - 1 if none), by the
    same binary searches as ``_rank_counts``: in each block, the first sorted rank above K."""
    big: tl.constexpr = 2147483647
    offs_b = tl.arange(0, NBG)
    best = tl.full([NBG], big, tl.int32)
    for g0 in range(0, nfull, NBG):
        b = g0 + offs_b
        okb = b < nfull
        base = SRANK + b * PB
        lo = tl.zeros([NBG], tl.int32)
        hi = lo + PB
        for _ in tl.static_range(STEPS):
            act = lo < hi
            mid = (lo + hi) // 2
            x = tl.load(base + tl.minimum(mid, PB - 1), mask=okb & act, other=0)
            le = x <= K
            lo = tl.where(act & le, mid + 1, lo)
            hi = tl.where(act & ~le, mid, hi)
        first = tl.load(base + tl.minimum(lo, PB - 1), mask=okb & (lo < PB), other=big)
        best = tl.minimum(best, first)
    pos = nfull * PB + tl.arange(0, PB)
    rk = tl.load(RANK + pos, mask=pos < a0, other=big)
    return tl.minimum(tl.min(best, 0), tl.min(tl.where(rk > K, rk, big), 0))


@triton.jit
def _above(SVALS, PSUM, U, thr, m1, nfull, a0, T: tl.constexpr,
           PB: tl.constexpr, NBG: tl.constexpr, STEPS: tl.constexpr):
    """Count [T] int32 and sum [T] float64 of the scores u among the first a0 positions with
    ``u > thr`` (where m1 is 1: ``u - 1 > thr``, as the (u - 1)-breakpoints compare), for the T
    thresholds thr [T]. Full blocks of PB positions: each block's scores sorted descending
    (SVALS, -inf padding) with their running sums (PSUM), so the scores that pass form a prefix,
    found by a binary search; the rest read directly (U)."""
    offs_b = tl.arange(0, NBG)
    minus = (m1 != 0)[:, None]
    cnt = tl.zeros([T], tl.int32)
    tot = tl.zeros([T], tl.float64)
    for g0 in range(0, nfull, NBG):
        b = g0 + offs_b
        okb = (b < nfull)[None, :]
        base = b[None, :] * PB
        lo = tl.zeros([T, NBG], tl.int32)  # entries < lo pass
        hi = lo + PB  # entries >= hi do not
        for _ in tl.static_range(STEPS):
            act = lo < hi
            mid = (lo + hi) // 2
            x = tl.load(SVALS + base + tl.minimum(mid, PB - 1), mask=okb & act, other=float("-inf"))
            ok = tl.where(minus, x - 1.0, x) > thr[:, None]
            lo = tl.where(act & ok, mid + 1, lo)
            hi = tl.where(act & ~ok, mid, hi)
        s = tl.load(PSUM + base + tl.maximum(lo - 1, 0), mask=okb & (lo > 0), other=0.0)
        cnt += tl.sum(tl.where(okb, lo, 0), 1)
        tot += tl.sum(s, 1)
    pos = nfull * PB + tl.arange(0, PB)
    inp = pos < a0
    x = tl.load(U + pos, mask=inp, other=float("-inf"))
    ok = inp[None, :] & (tl.where(minus, x[None, :] - 1.0, x[None, :]) > thr[:, None])
    cnt += tl.sum(ok.to(tl.int32), 1)
    tot += tl.sum(tl.where(ok, x[None, :], 0.0), 1)
    return cnt, tot


@triton.jit
def _f_at(SVALS, PSUM, U, t, nfull, a0, PIV: tl.constexpr, PB: tl.constexpr, NBG: tl.constexpr,
          STEPS: tl.constexpr):
    """f(t_j) = sum over the first a0 scores of clip(u - t_j, 0, 1) for the pivots t [PIV]:
    G(t) - G(t + 1), G(x) = sum over u > x of (u - x); both thresholds of every pivot searched
    together."""
    t1 = t + 1.0
    thr = tl.reshape(tl.join(t, t1), [2 * PIV])
    c, s = _above(SVALS, PSUM, U, thr, tl.zeros([2 * PIV], tl.int32), nfull, a0, 2 * PIV, PB, NBG, STEPS)
    c1, c2 = tl.split(tl.reshape(c, [PIV, 2]))
    s1, s2 = tl.split(tl.reshape(s, [PIV, 2]))
    return (s1 - t * c1) - (s2 - t1 * c2)


# S = 1 specialised to a constant broke triton 3.6's coalescing pass (PassManager::run failed).
@triton.jit(do_not_specialize=["S", "k"])
def _chunk_start(
    U, RANK, SRANK, SVALS, PSUM, IUR, IVR, BVAL, STARTS, STATE_I, STATE_F,
    S, k, NC, NBLK,
    PIV: tl.constexpr, PB: tl.constexpr, NBG: tl.constexpr, STEPS: tl.constexpr, SLACK: tl.constexpr,
):
    """Solve the first prefix (a0 pairs) of chunk c from scratch. Writes STATE_I[r, c] = (ptr, cA,
    cB, K, tsize) and STATE_F[r, c] = (tau, sA, sB, shift); see _walk for their meaning.

    Every question about the first a0 positions (how many have rank <= m; how many scores, and
    their sum, lie above x) is answered from the row's blocks of PB positions, each sorted once
    (``_rank_counts``, ``_next_rank``, ``_above``): binary searches in the a0 // PB full blocks,
    NBG blocks at a time, and one direct read of the last, partial block. So a pass of a search
    costs about log2(PB) dependent loads, whatever a0 is, instead of a scan of a0 scores (the
    longest chunk starts scanned about 10K scores per pass at S = 32K)."""
    c = tl.program_id(0)
    r = tl.program_id(1)
    a0 = tl.load(STARTS + c)
    P = 2 * S
    offs = tl.arange(0, PB)
    tsize = tl.minimum(a0, k)
    ptr = 0
    cA = 0
    cB = 0
    tau = tl.full([], float("-inf"), tl.float64)
    sA = tl.zeros([], tl.float64)
    sB = tl.zeros([], tl.float64)
    shift = tl.zeros([], tl.float64)
    RANK_ROW = RANK + r * S
    U_ROW = U + r * S
    nfull = a0 // PB
    rb = r.to(tl.int64) * NBLK * PB
    SRANK_ROW = SRANK + rb
    SVALS_ROW = SVALS + rb
    PSUM_ROW = PSUM + rb
    if a0 <= k:
        # At most k candidates: all are kept. K = the largest rank among them.
        kk = tl.full([PB], -1, tl.int32)
        for p0 in range(0, a0, PB):
            pos = p0 + offs
            kk = tl.maximum(kk, tl.load(RANK_ROW + pos, mask=pos < a0, other=-1))
        K = tl.max(kk, 0)
    else:
        # K: the smallest rank R with k of the first a0 ranks <= R, by pivot passes; K1: the
        # next rank among them.
        j = tl.arange(0, PIV)
        lo_r = -1  # count(<= lo_r) < k
        hi_r = S - 1  # count(<= hi_r) >= k
        while hi_r - lo_r > 1:
            m = lo_r + ((hi_r - lo_r) * (j + 1)) // (PIV + 1)
            m = tl.minimum(tl.maximum(m, lo_r + 1), hi_r - 1)
            ok = _rank_counts(SRANK_ROW, RANK_ROW, m, nfull, a0, PB, NBG, STEPS) >= k
            new_hi = tl.min(tl.where(ok, m, hi_r), 0)
            new_lo = tl.max(tl.where(ok, lo_r, m), 0)
            hi_r = new_hi
            lo_r = new_lo
        K = hi_r
        K1 = _next_rank(SRANK_ROW, RANK_ROW, K, nfull, a0, PB, NBG, STEPS)
        # tau: the largest breakpoint index m with f(bval[m]) >= k - slack, the rule of
        # selection.prefix_threshold. Bracket: f >= k + 1 at v_{k+1} - 1 (breakpoint IVR[K1])
        # and f <= k - 1 at v_k (breakpoint IUR[K]).
        lo = tl.load(IVR + r * S + K1)
        hi = tl.load(IUR + r * S + K)
        kf = tl.full([], k, tl.float64) - SLACK
        while hi - lo > 1:
            m = lo + ((hi - lo) * (j + 1)) // (PIV + 1)
            m = tl.minimum(tl.maximum(m, lo + 1), hi - 1)
            t = tl.load(BVAL + r * P + m)
            ok = _f_at(SVALS_ROW, PSUM_ROW, U_ROW, t, nfull, a0, PIV, PB, NBG, STEPS) >= kf
            new_lo = tl.max(tl.where(ok, m, lo), 0)
            new_hi = tl.min(tl.where(ok, hi, m), 0)
            lo = new_lo
            hi = new_hi
        ptr = lo + 1
        b_lo = tl.load(BVAL + r * P + lo)
        # Counts and sums of the linear piece right of b_lo: A = {u > b_lo} (u-breakpoint not yet
        # crossed: every breakpoint equal to b_lo has an index <= lo, so "index >= ptr" is
        # "value > b_lo"), B = {u - 1 > b_lo}; sums of (u - shift), shift = b_lo.
        shift = b_lo
        two = tl.arange(0, 2)
        cnt, tot = _above(SVALS_ROW, PSUM_ROW, U_ROW, tl.zeros([2], tl.float64) + b_lo, two, nfull, a0, 2,
                          PB, NBG, STEPS)
        cA = tl.sum(tl.where(two == 0, cnt, 0), 0)
        cB = tl.sum(tl.where(two == 1, cnt, 0), 0)
        sA = tl.sum(tl.where(two == 0, tot, 0.0), 0) - shift * cA
        sB = tl.sum(tl.where(two == 1, tot, 0.0), 0) - shift * cB
        b_hi = tl.load(BVAL + r * P + tl.minimum(ptr, P - 1))
        b_hi = tl.where(ptr < P, b_hi, float("inf"))
        tau = _solve(b_lo, sA, sB, cA, cB, shift, k, b_hi)
    base = (r * NC + c) * 5
    tl.store(STATE_I + base + 0, ptr)
    tl.store(STATE_I + base + 1, cA)
    tl.store(STATE_I + base + 2, cB)
    tl.store(STATE_I + base + 3, K)
    tl.store(STATE_I + base + 4, tsize)
    basef = (r * NC + c) * 4
    tl.store(STATE_F + basef + 0, tau)
    tl.store(STATE_F + basef + 1, sA)
    tl.store(STATE_F + basef + 2, sB)
    tl.store(STATE_F + basef + 3, shift)


@triton.jit
def _solve(b_lo, sA, sB, cA, cB, shift, k, b_hi):
    """projection.solve_in_bracket on the piece right of b_lo: f(x) = (sA - (x - shift) cA) -
    (sB - (x - shift + 1) cB), slope -(cA - cB)."""
    x = b_lo - shift
    f_lo = (sA - x * cA) - (sB - (x + 1.0) * cB)
    nF = cA - cB
    step = (f_lo - k) / tl.maximum(nF, 1).to(tl.float64)
    tau = tl.where(nF > 0, b_lo + step, b_lo)
    return tl.minimum(tl.maximum(tau, b_lo), b_hi)


@triton.jit
def _breakpoints(BVAL, BPOS, BTYP, BU, r, P, ptr, offs_t):
    """The breakpoints ptr + offs_t of row r (of P): in range, value, position, type, score, and
    the previous entry's value (to find the starts of runs of equal breakpoints)."""
    e = ptr + offs_t
    ine = e < P
    bv = tl.load(BVAL + r * P + e, mask=ine, other=float("inf"))
    bp = tl.load(BPOS + r * P + e, mask=ine, other=2147483647)
    bt = tl.load(BTYP + r * P + e, mask=ine, other=0)
    bu = tl.load(BU + r * P + e, mask=ine, other=0.0)
    bv_prev = tl.load(BVAL + r * P + e - 1, mask=ine & (e >= 1), other=float("-inf"))
    return ine, bv, bp, bt, bu, bv_prev


# S = 1 specialised to a constant broke triton 3.6's coalescing pass (PassManager::run failed).
@triton.jit(do_not_specialize=["S", "k"])
def _walk(
    U, PS, RANK, IU, IV, BVAL, BPOS, BTYP, BU, STARTS, STATE_I, STATE_F,
    TAU_N, TAU_Q, FIRST_BAD, K_N, EVICT,
    S, k, window, NC,
    TB: tl.constexpr, SLACK: tl.constexpr,
):
    """Walk chunk c: for every prefix n of the chunk write tau(n) (TAU_N [R, S+1]) and K(n)
    (K_N), and the eviction index of every pair that this chunk adds or evicts (EVICT [R, S]).

    State (for the current prefix): the top-k is every position of rank <= K (tsize of them);
    ptr = the number of sorted breakpoints (BVAL [R, 2S]) already crossed by the threshold; the
    pairs present with their u-breakpoint not crossed form A (u > t) and with their
    (u - 1)-breakpoint not crossed form B (u - 1 > t), with counts cA, cB and sums sA, sB of
    (u - shift); tau is the current threshold.
    """
    c = tl.program_id(0)
    r = tl.program_id(1)
    a0 = tl.load(STARTS + c)
    a1 = tl.load(STARTS + c + 1)
    P = 2 * S
    base = (r * NC + c) * 5
    ptr = tl.load(STATE_I + base + 0)
    cA = tl.load(STATE_I + base + 1)
    cB = tl.load(STATE_I + base + 2)
    K = tl.load(STATE_I + base + 3)
    tsize = tl.load(STATE_I + base + 4)
    basef = (r * NC + c) * 4
    tau = tl.load(STATE_F + basef + 0)
    sA = tl.load(STATE_F + basef + 1)
    sB = tl.load(STATE_F + basef + 2)
    shift = tl.load(STATE_F + basef + 3)
    slack = tl.full([], k, tl.float64) - SLACK
    offs_t = tl.arange(0, TB)
    big: tl.constexpr = 2147483647
    first_bad = tl.load(FIRST_BAD + r)
    if a0 == 0:
        for i0 in range(0, tl.minimum(window, S), TB):
            qi = i0 + offs_t
            tl.store(TAU_Q + r * S + qi, tl.full([TB], float("-inf"), tl.float64), mask=qi < tl.minimum(window, S))
    # The walk is a chain of dependent steps per live pair, so its time is latency: pair s's
    # values come from memory (a cache hit) instead of a warp reduction each, the bracket's ends
    # too, and the two tiles a live pair may need (the ranks below K, the breakpoints from ptr)
    # are requested at the top of the step, before the branches, so that their round trips
    # overlap (20-30% off the walk on the H100, bench/NOTES.md "Session 8").
    for t0 in range(a0, a1, TB):
        n = t0 + offs_t  # prefixes of this tile; pair n is added after prefix n is written
        in_chunk = n < a1
        has = in_chunk & (n < S)
        rk = tl.load(RANK + r * S + n, mask=has, other=big)
        iu = tl.load(IU + r * S + n, mask=has, other=-1)
        tau_v = tl.zeros([TB], tl.float64) + tau
        k_v = tl.zeros([TB], tl.int32) + K
        # Live pairs: they enter the top-k, or (past the first k + 1 pairs) lie above tau.
        live = has & ((tsize < k) | (rk < K) | ((n > k) & (iu >= ptr)))
        done = n < t0
        s = tl.min(tl.where(live, n, big), 0)
        while s < big:
            done = done | (n == s)
            rk_s = tl.load(RANK + r * S + s)
            iu_s = tl.load(IU + r * S + s)
            iv_s = tl.load(IV + r * S + s)
            u_s = tl.load(U + r * S + s) - shift
            # The ranks K - TB .. K - 1 (for an eviction) and the breakpoints ptr .. ptr + TB - 1
            # (for a threshold move), requested before either is known to be needed.
            rr = K - TB + offs_t
            pos = tl.load(PS + r * S + rr, mask=rr >= 0, other=big)
            pos_k = tl.load(PS + r * S + tl.maximum(K, 0))
            ine, bv, bp, bt, bu, bv_prev = _breakpoints(BVAL, BPOS, BTYP, BU, r, P, ptr, offs_t)
            # Top-k: add pair s, evicting the worst (rank K) when full.
            if tsize < k:
                tsize += 1
                K = tl.maximum(K, rk_s)
            elif rk_s < K:
                # Evict the pair of rank K; the new K is the largest rank below K held by a
                # position <= s (present).
                tl.store(EVICT + r * S + pos_k, s + window)
                nk = tl.max(tl.where((pos <= s) & (rr >= 0), rr, -1), 0)
                hi_r = K - TB
                while nk < 0:
                    rr = hi_r - TB + offs_t
                    pos = tl.load(PS + r * S + rr, mask=rr >= 0, other=big)
                    nk = tl.max(tl.where((pos <= s) & (rr >= 0), rr, -1), 0)
                    hi_r -= TB
                K = nk
            else:
                tl.store(EVICT + r * S + s, s + window)
            # Threshold: only for prefixes past the first solved one (s >= k + 1 adds to prefix
            # s + 1 >= k + 2), and only if pair s lies above the threshold.
            if (s > k) & (iu_s >= ptr):
                cA += 1
                sA += u_s
                if iv_s >= ptr:
                    cB += 1
                    sB += u_s
                # Move right, a tile of breakpoints at a time, while f at the next run of equal
                # breakpoints (evaluated before crossing it) stays >= k - slack.
                go = ptr < P
                while go:
                    bu = bu - shift
                    present = bp <= s
                    dA = (present & (bt == 1)).to(tl.int32)
                    dB = (present & (bt == 0)).to(tl.int32)
                    exA = tl.cumsum(dA, 0) - dA
                    exB = tl.cumsum(dB, 0) - dB
                    eA = tl.where(dA > 0, bu, 0.0)
                    eB = tl.where(dB > 0, bu, 0.0)
                    xsA = tl.cumsum(eA, 0) - eA
                    xsB = tl.cumsum(eB, 0) - eB
                    x = tl.where(ine, bv - shift, 0.0)  # no inf * 0 past the end
                    f = ((sA - xsA) - x * (cA - exA)) - ((sB - xsB) - (x + 1.0) * (cB - exB))
                    run_start = bv != bv_prev
                    stop = run_start & ((f < slack) | ~ine)
                    first = tl.min(tl.where(stop, offs_t, TB), 0)
                    cross = offs_t < first
                    cA -= tl.sum(tl.where(cross, dA, 0), 0)
                    cB -= tl.sum(tl.where(cross, dB, 0), 0)
                    sA -= tl.sum(tl.where(cross, eA, 0.0), 0)
                    sB -= tl.sum(tl.where(cross, eB, 0.0), 0)
                    ptr += first
                    go = (first == TB) & (ptr < P)
                    if go:  # every breakpoint of the tile crossed: the next tile
                        ine, bv, bp, bt, bu, bv_prev = _breakpoints(BVAL, BPOS, BTYP, BU, r, P, ptr, offs_t)
                # The bracket: the last crossed breakpoint and the first one not crossed.
                b_lo = tl.load(BVAL + r * P + tl.maximum(ptr - 1, 0))
                b_hi = tl.load(BVAL + r * P + tl.minimum(ptr, P - 1))
                b_hi = tl.where(ptr < P, b_hi, float("inf"))
                tau = _solve(b_lo, sA, sB, cA, cB, shift, k, b_hi)
            after = n > s
            tau_v = tl.where(after, tau, tau_v)
            k_v = tl.where(after, K, k_v)
            live = has & ~done & ((tsize < k) | (rk < K) | ((n > k) & (iu >= ptr)))
            s = tl.min(tl.where(live, n, big), 0)
        # Pairs of this tile that were never live never enter the top-k.
        tl.store(EVICT + r * S + n, n + window, mask=has & ~done)
        tau_v = tl.where(n > k, tau_v, float("-inf"))
        tl.store(TAU_N + r * (S + 1) + n, tau_v, mask=in_chunk)
        # By query: query i sees prefix n = i + 1 - window (queries < window see n = 0); a prefix
        # holding a non-finite score is poisoned.
        tau_v = tl.where(n > first_bad, float("nan"), tau_v)
        qi = n - 1 + window
        tl.store(TAU_Q + r * S + qi, tau_v, mask=in_chunk & (n >= 1) & (qi < S))
        tl.store(K_N + r * (S + 1) + n, tl.where(n > k, k_v, S), mask=in_chunk)


# S = 1 specialised to a constant broke triton 3.6's coalescing pass (PassManager::run failed).
@triton.jit(do_not_specialize=["S", "k"])
def _block_lists(
    PS, RANK, K_N, EVICT, LISTS,
    S, k, window, NB, L,
    BMQ: tl.constexpr, BLK: tl.constexpr,
):
    """LISTS[r, b, :]: the pairs selected by any query of block b (queries b*BMQ ..): the top-k
    of its first prefix, then its newcomers that enter the top-k; -1 after."""
    b = tl.program_id(0)
    r = tl.program_id(1)
    i_first = b * BMQ
    i_last = tl.minimum(i_first + BMQ, S) - 1
    n_first = tl.maximum(i_first + 1 - window, 0)
    n_last = tl.maximum(i_last + 1 - window, 0)
    out = LISTS + (r * NB + b) * L
    offs = tl.arange(0, BLK)
    cnt = 0
    if n_first <= k:
        for p0 in range(0, n_first, BLK):
            pos = p0 + offs
            tl.store(out + pos, pos, mask=pos < n_first)
        cnt = n_first
    else:
        K = tl.load(K_N + r * (S + 1) + n_first)
        if n_first <= K:  # fewer positions than ranks to read: scan the positions (ascending)
            for p0 in range(0, n_first, BLK):
                pos = p0 + offs
                rk = tl.load(RANK + r * S + pos, mask=pos < n_first, other=2147483647)
                keep = rk <= K
                slot = cnt + tl.cumsum(keep.to(tl.int32), 0) - 1
                tl.store(out + slot, pos, mask=keep)
                cnt += tl.sum(keep.to(tl.int32), 0)
        else:  # rank order: the positions of rank <= K below n_first
            for r0 in range(0, K + 1, BLK):
                rr = r0 + offs
                pos = tl.load(PS + r * S + rr, mask=rr <= K, other=2147483647)
                keep = pos < n_first
                slot = cnt + tl.cumsum(keep.to(tl.int32), 0) - 1
                tl.store(out + slot, pos, mask=keep)
                cnt += tl.sum(keep.to(tl.int32), 0)
    # Newcomers: pairs n_first <= j < n_last that enter the top-k when they arrive.
    for p0 in range(n_first, n_last, BLK):
        j = p0 + offs
        inj = j < n_last
        ev = tl.load(EVICT + r * S + j, mask=inj, other=0)
        keep = inj & (ev > j + window)
        slot = cnt + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(out + slot, j, mask=keep)
        cnt += tl.sum(keep.to(tl.int32), 0)
    for p0 in range(cnt, L, BLK):
        slot = p0 + offs
        tl.store(out + slot, -1, mask=slot < L)


def rank_order(x: Tensor) -> Tensor:
    """The positions of each row of x [R, S] (float32, finite) by score, descending, ties to the
    earlier position: [R, S] int32, ``torch.sort(x, 1, descending=True, stable=True).indices``.

    Rows of FLAT_SORT_FROM or more: one stable sort of the whole tensor on int64 keys (row, then
    the score's bits mapped to an order-reversing unsigned 32-bit integer), because PyTorch
    sorts a few long rows by a segmented scheme several times slower on a GPU (bench/NOTES.md,
    session 10). -0.0 and 0.0 get one key, as they compare equal."""
    R, S = x.shape
    if S < FLAT_SORT_FROM:
        return torch.sort(x, dim=1, descending=True, stable=True).indices.to(torch.int32)
    b = (x + 0.0).view(torch.int32)  # x + 0.0 turns -0.0 into 0.0
    # Read as unsigned, d falls as the score rises: non-negative scores' bits are reversed into
    # [0, 2^31), negative ones keep theirs, which read as unsigned lie in [2^31, 2^32) and grow
    # as the score falls. Key = row * 2^32 + unsigned(d), by int64 promotion.
    d = torch.where(b >= 0, b ^ 0x7FFFFFFF, b)  # (xor: 0x7FFFFFFF - b without int32 overflow)
    key = ((torch.arange(R, device=x.device)[:, None] + (d < 0)) << 32) + d
    idx = torch.sort(key.view(-1), stable=True).indices
    return torch.remainder(idx, S).view(R, S).to(torch.int32)


def select(u: Tensor, topk: int, window: int, block_m: int = 64, fractional: bool = True,
           list_width: int | None = None) -> Selection:
    """``selection.select`` on the GPU (or in the Triton interpreter): same fields, same values,
    except that gather lists are in rank order and ``evict``/``block_index`` are int32.

    u: [B, H, S] scores, any float dtype (computed in float64). No host synchronisation.
    ``list_width``: the gather lists' width L when topk > 0 (at least ``min(topk + block_m, S)``,
    the most a block can gather; the rest is -1 padding). The Inductor lowering asks for
    ``topk + block_m``, a width that does not depend on S.
    """
    B, H, S = u.shape
    dev = u.device
    R = B * H
    NB = -(-S // block_m)
    L = min(topk + block_m, S) if topk > 0 else 0
    if topk > 0 and list_width is not None:
        if list_width < L:
            raise ValueError(f"list_width must be at least min(topk + block_m, S) = {L}, got {list_width}")
        L = list_width
    u64 = u.detach().reshape(R, S).to(torch.float64)
    bad = ~torch.isfinite(u64)
    uc = torch.where(bad, 0.0, u64).contiguous()
    if topk == 0 or S == 0:
        n_i = candidate_counts(S, window, dev)
        seen_bad = torch.cat([bad.new_zeros(R, 1), bad.cumsum(1) > 0], 1)
        tau = torch.where(seen_bad, float("nan"), float("-inf")).to(torch.float64)[:, n_i]
        evict = (torch.arange(S, device=dev, dtype=torch.int32) + window).expand(R, S).contiguous()
        lists = torch.empty(R, NB, 0, dtype=torch.int32, device=dev)
        n_frac = torch.zeros(R, S, dtype=torch.int32, device=dev) if fractional else None
        return Selection(tau, n_frac, evict, lists, topk, window, block_m)
    # The first non-finite position of each row (S if none): it poisons every later prefix.
    first_bad = torch.where(bad, torch.arange(S, device=dev), S).amin(1).to(torch.int32)
    # Scores in rank order (descending, ties to the earlier position), then the breakpoints.
    # Scores that float32 holds exactly (float32, bfloat16, float16) sort as float32: the same
    # order, and half the radix passes of float64.
    if u.dtype in (torch.float32, torch.bfloat16, torch.float16):
        ps = rank_order(torch.where(bad, 0.0, u.detach().reshape(R, S).float()))
    else:
        ps = torch.sort(uc, dim=1, descending=True, stable=True).indices.to(torch.int32)
    vals = uc.gather(1, ps.long())
    P = 2 * S
    rank = torch.empty(R, S, dtype=torch.int32, device=dev)
    bval = torch.empty(R, P, dtype=torch.float64, device=dev)
    bpos = torch.empty(R, P, dtype=torch.int32, device=dev)
    btyp = torch.empty(R, P, dtype=torch.int32, device=dev)
    bu = torch.empty(R, P, dtype=torch.float64, device=dev)
    iu, iv, iur, ivr = (torch.empty(R, S, dtype=torch.int32, device=dev) for _ in range(4))
    _prepare[(triton.cdiv(S, 256), R)](vals, ps, rank, bval, bpos, btyp, bu, iu, iv, iur, ivr,
                                       S, BLK=256, STEPS=max(1, S.bit_length()), num_warps=4)
    starts = chunk_starts(S, topk, live_per_chunk(S, topk, R), dev)
    NC = starts.numel() - 1
    state_i = torch.empty(R, NC, 5, dtype=torch.int32, device=dev)
    state_f = torch.empty(R, NC, 4, dtype=torch.float64, device=dev)
    # Blocks of START_BLOCK positions, each sorted by rank (so by score, descending), with the
    # running sums of their scores: every count or sum over a prefix of positions that a chunk
    # start asks for is a binary search per full block (_chunk_start).
    PB, NBG = (START_LONG_BLOCK, START_LONG_GROUP) if S >= START_LONG_FROM else (START_BLOCK, START_GROUP)
    NBLK = -(-S // PB)
    srank = torch.sort(F.pad(rank, (0, NBLK * PB - S), value=S).view(R * NBLK, PB), dim=1).values.view(R, -1)
    svals = F.pad(vals, (0, 1), value=float("-inf")).gather(1, srank.long())  # rank S: padding
    psum = torch.where(srank < S, svals, 0.0).view(R * NBLK, PB).cumsum(1).view(R, -1)
    _chunk_start[(NC, R)](
        uc, rank, srank, svals, psum, iur, ivr, bval, starts, state_i, state_f,
        S, topk, NC, NBLK, PIV=PIVOTS, PB=PB, NBG=min(NBG, triton.next_power_of_2(NBLK)),
        STEPS=PB.bit_length(), SLACK=F_SLACK, num_warps=START_WARPS,
    )
    tau_n = torch.empty(R, S + 1, dtype=torch.float64, device=dev)
    tau = torch.empty(R, S, dtype=torch.float64, device=dev)
    k_n = torch.empty(R, S + 1, dtype=torch.int32, device=dev)
    evict = torch.full((R, S), S + window, dtype=torch.int32, device=dev)
    _walk[(NC, R)](
        uc, ps, rank, iu, iv, bval, bpos, btyp, bu, starts, state_i, state_f,
        tau_n, tau, first_bad, k_n, evict, S, topk, window, NC, TB=WALK_TB, SLACK=F_SLACK, num_warps=WALK_WARPS,
    )
    lists = torch.empty(R, NB, L, dtype=torch.int32, device=dev)
    _block_lists[(NB, R)](ps, rank, k_n, evict, lists, S, topk, window, NB, L, BMQ=block_m, BLK=128, num_warps=4)
    n_frac = fractional_counts(vals, ps, tau_n, window) if fractional else None
    return Selection(tau, n_frac, evict, lists, topk, window, block_m)


def _prefix_count(thr: Tensor, vals: Tensor, ps: Tensor, strict: bool) -> Tensor:
    """For every prefix n = 0..S: #{l < n : u_l >= thr[n]} (``> thr[n]`` if strict), thr [R, S+1]
    non-decreasing in n. vals [R, S]: the scores of a whole row, any order; ps their positions
    (a permutation of 0..S-1).

    thr is monotone, so pair l counts for one range of prefixes, from l + 1 to the first n whose
    threshold no longer admits it (``stop``): count(n) = #{l + 1 <= n} - #{stops <= n}, where the
    first term is n (ps holds every position once); the second is a sort and a searchsorted.
    No scatter, so it is deterministic (``scatter_add_`` on CUDA is not).
    """
    R, S1 = thr.shape
    stop = torch.searchsorted(thr.contiguous(), vals.contiguous(), right=not strict)
    stop = torch.maximum(stop, ps.long() + 1)  # in [1, S1]
    if S1 <= FLAT_SORT_FROM:
        stop = stop.sort(1).values
    else:  # every row's stops sorted by one sort of the whole tensor (row-major keys), as rank_order
        base = torch.arange(R, device=thr.device)[:, None] * (S1 + 1)
        stop = (torch.sort((stop + base).view(-1)).values.view(R, -1) - base).contiguous()
    n = torch.arange(S1, device=thr.device).expand(R, S1).contiguous()
    return (n - torch.searchsorted(stop, n, right=True)).to(torch.int32)


def fractional_counts(vals: Tensor, ps: Tensor, tau_n: Tensor, window: int) -> Tensor:
    """``|F_i| = #{l < n_i : tau_i < u_l < fl(tau_i + 1)}`` by query, [R, S] int32: the F test of
    ``selection.prefix_fractional_counts`` (and of the kernels), computed without scatters."""
    S = vals.shape[1]
    tau = tau_n.nan_to_num(nan=float("inf"))
    above = _prefix_count(tau, vals, ps, strict=True)  # u > tau
    full = _prefix_count(tau + 1, vals, ps, strict=False)  # u >= fl(tau + 1)
    n_i = candidate_counts(S, window, vals.device)
    return (above - full)[:, n_i]


def select_for(u: Tensor, topk: int, window: int, block_m: int, fractional: bool) -> Selection:
    """The selection the Triton kernels use: the Triton walk on CUDA tensors, the PyTorch search
    elsewhere (the interpreter runs the walk slowly; both give the same selection)."""
    if u.is_cuda:
        return select(u, topk, window, block_m, fractional)
    return torch_selection.select(u, topk, window, block_m, fractional)
