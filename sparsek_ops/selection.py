"""Selection for causal prefixes: who each query attends to, for every query at once.

Query ``i`` (DESIGN.md section 2) has the candidates ``C_i = {j : j + window <= i}``, i.e. the
first ``n_i = max(0, i + 1 - window)`` positions. So every quantity of the selection is a
function of a *prefix* of the score sequence ``u``:

* ``tau(n)``: the capped-simplex threshold of ``u[:n]`` (``projection.py``);
* ``kth(n)``: the k-th smallest *rank* in ``u[:n]``, where ``rank`` orders all positions by
  score, descending, ties to the earlier position. Pair ``j`` is in the top-k of ``u[:n]``
  iff ``j < n`` and ``rank[j] <= kth(n)``.

Both are monotone in ``n`` (``tau`` non-decreasing, ``kth`` non-increasing: DESIGN section 3,
facts 1 and 2). We find them for all ``n`` with a *parallel binary search*: every prefix
searches at once, and after each step the search brackets are made monotone in ``n``
(which is valid because the answers are). Monotone thresholds turn the hard part, "sum over
``l < n`` of the points below ``t_n``" (a 2-D dominance query), into finding for each point
the first n that admits it, then a ``scatter_add`` and a ``cumsum`` (``_prefix_below``).
Inside the searches the thresholds are integers (indices into the sorted breakpoints, or
ranks), so that first n comes from a histogram of the thresholds, with no search at all
(``_prefix_below_int``). O(S) work per step, O(log S) steps, O(S) memory per head;
no S x S and no S x topk tensor, no Python loop over positions.

From ``kth`` every pair gets one eviction index (fact 2): pair ``j`` is selected by exactly
the queries ``j + window <= i < evict[j]``. From those intervals, every block of
``block_m`` queries gets its gather list: the union of the selections of its queries,
at most ``topk + block_m`` pairs (fact 3).

Scores that are not finite (NaN, +-inf) poison every query that can see them: their
``tau`` is NaN, so their weights and outputs are NaN, while every other query is computed as
if the score were 0 (its prefix does not reach the bad score, so it is unaffected).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .projection import F_SLACK, solve_in_bracket


@dataclass
class Selection:
    """Selection of one call, for ``R = batch * kv_heads`` rows of ``S`` positions.

    tau:         [R, S] float64, threshold of query i (-inf: all candidates kept, NaN: poisoned)
    n_frac:      [R, S] int32, |F_i|, the number of fractional candidates of query i (or None)
    evict:       [R, S] int64, pair j is selected by queries ``j + window <= i < evict[j]``
                 (``evict[j] = j + window``: never selected; ``>= S``: selected at the end)
    block_index: [R, NB, L] int64, positions gathered by each block of ``block_m`` queries,
                 ascending, padded with -1; ``L = min(topk + block_m, S)`` (0 when topk = 0)
    """

    tau: Tensor
    n_frac: Tensor
    evict: Tensor
    block_index: Tensor
    topk: int
    window: int
    block_m: int


def padded_lists(block_index: Tensor, width: int | None) -> Tensor:
    """Gather lists [R, NB, L] as int32, padded with -1 to ``width`` entries (None, or not wider
    than L: as they are); the fixed width the Inductor lowering asks for (``topk + block_m``)."""
    lists = block_index.to(torch.int32)
    if width is not None and lists.shape[-1] < width:
        lists = torch.nn.functional.pad(lists, (0, width - lists.shape[-1]), value=-1)
    return lists


def candidate_counts(S: int, window: int, device=None) -> Tensor:
    """``n_i = max(0, i + 1 - window)``: the number of candidates of query ``i``. [S] int64."""
    return (torch.arange(S, device=device) + 1 - window).clamp_min(0)


class _Points:
    """Points (position l, value x_l) of every row, stored sorted by value: xs [R, S] ascending,
    pos [R, S] their positions. Sorted values make each ``searchsorted`` below walk the
    thresholds in order, about 2.5x faster than random values on CPU."""

    def __init__(self, xs: Tensor, pos: Tensor):
        self.xs, self.pos = xs.contiguous(), pos

    @classmethod
    def of(cls, x: Tensor, order: Tensor | None = None) -> "_Points":
        """The points of x; ``order`` may give positions by descending value (as ``sort_desc``)."""
        pos = torch.sort(x, dim=1).indices if order is None else order.flip(1)
        return cls(x.gather(1, pos), pos)


def _prefix_below(pts: _Points, t: Tensor, strict: bool = False) -> Tensor:
    """For every prefix length ``n = 0..S``: how many points ``l < n`` have ``x[l] <= t[n]``
    (``< t[n]`` if ``strict``). t: [R, S+1] float thresholds, non-decreasing in n.

    Since t is monotone, point l is counted by exactly the n >= max(l + 1, first n whose
    threshold admits it): one searchsorted per point, then a histogram and a cumsum.
    Returns count [R, S+1] int32.
    """
    first = torch.searchsorted(t, pts.xs, right=strict)
    return _admitted(torch.maximum(first, pts.pos + 1), t.shape[1])[0]


def _admitted(start: Tensor, S1: int, weights: Tensor | None = None):
    """Point l is counted by every n >= start[l]: for n = 0 .. S1-1, how many points are counted
    (int32), and the sum of their weights. A histogram of ``start`` and a cumsum."""
    R = start.shape[0]
    count = torch.zeros(R, S1 + 1, dtype=torch.int32, device=start.device)
    count.scatter_add_(1, start, torch.ones(start.shape, dtype=torch.int32, device=start.device))
    count = count.cumsum(1, dtype=torch.int32)[:, :S1]
    if weights is None:
        return count, None
    total = weights.new_zeros(R, S1 + 1).scatter_add_(1, start, weights)
    return count, total.cumsum(1)[:, :S1]


def _prefix_below_int(keys: Tensor, pos: Tensor, thr: Tensor, nbins: int, weights: Tensor | None = None):
    """``_prefix_below`` for integer keys and thresholds, with no search at all, and optionally
    the sums of weights.

    For every n = 0..S: how many points l < n have ``keys[l] <= thr[n]``, and the sum of their
    ``weights``. keys [R, N] in [0, nbins); pos [R, N] their positions; thr [R, S+1] non-decreasing
    in n, in [-1, nbins). The first n admitting point l is ``#{n : thr[n] < keys[l]}``, read off a
    histogram of the thresholds: O(S + nbins) per call.
    """
    R, S1 = thr.shape
    # int32 counts: half the memory traffic of int64 (indices stay int64, as torch wants).
    hist = torch.zeros(R, nbins + 1, dtype=torch.int32, device=thr.device)
    hist.scatter_add_(1, thr + 1, torch.ones(thr.shape, dtype=torch.int32, device=thr.device))
    first = hist.cumsum(1, dtype=torch.int32).gather(1, keys)  # #{n : thr[n] < key}
    return _admitted(torch.maximum(first, pos + 1), S1, weights)


def _prefix_sums(x: Tensor) -> Tensor:
    return torch.cat([x.new_zeros(x.shape[0], 1), x.cumsum(1)], 1)


def _soft_count(x: Tensor, keys: Tensor, pos: Tensor, cs: Tensor, n: Tensor, bps: Tensor, m: Tensor) -> Tensor:
    """``f_n(t_n) = sum_{l < n} clip(u_l - t_n, 0, 1)`` at ``t_n = bps[m_n]`` for every n (m
    non-decreasing in n), written as ``G(u) - G(u - 1)`` with ``G(x) = sum_{l < n, x_l > t} (x_l - t)``.

    x: the values u stacked over u - 1 ([2R, S]); keys: their first index in bps (so that
    ``x <= bps[m]`` iff ``key <= m``); pos: their positions; cs: prefix sums of x [2R, S+1]."""
    t = bps.gather(1, m)
    m2, t2 = torch.cat([m, m]), torch.cat([t, t])
    cnt_le, sum_le = _prefix_below_int(keys, pos, m2, bps.shape[1], x)
    g = (cs - sum_le) - t2 * (n - cnt_le)
    R = m.shape[0]
    return g[:R] - g[R:]


def _reverse_cummin(x: Tensor) -> Tensor:
    return x.flip(1).cummin(1).values.flip(1)


def _reverse_cummax(x: Tensor) -> Tensor:
    return x.flip(1).cummax(1).values.flip(1)


def prefix_threshold(u: Tensor, k: int) -> Tensor:
    """``tau(n)`` of every prefix ``u[:, :n]``, n = 0..S: [R, S+1] float64, -inf where ``n <= k``.

    u: [R, S] float64, finite. Exact up to float64 rounding; tau is made exactly
    non-decreasing (cummax), which only removes rounding noise.
    """
    R, S = u.shape
    dev = u.device
    n = torch.arange(S + 1, device=dev)
    tau = torch.full((R, S + 1), float("-inf"), dtype=u.dtype, device=dev)
    if k == 0 or S <= k:
        return tau
    x = torch.cat([u, u - 1])  # u over u - 1: the points whose clipped sum is f
    cs = _prefix_sums(x)
    P = 2 * S
    bps, perm = torch.cat([u, u - 1], 1).sort(1)  # breakpoints [R, P]; entry e of the cat sits at inv[e]
    bps = bps.contiguous()
    # Keys of every point: the first and one past the last index of its value in bps, so that
    # x <= bps[m] iff key_le <= m, and x < bps[m] iff key_lt <= m (no search needed).
    idx = torch.arange(P, device=dev).expand(R, P)
    new = torch.ones_like(bps, dtype=torch.bool)
    new[:, 1:] = bps[:, 1:] != bps[:, :-1]
    run_first = torch.where(new, idx, 0).cummax(1).values
    end = torch.ones_like(new)
    end[:, :-1] = new[:, 1:]
    run_next = _reverse_cummin(torch.where(end, idx + 1, P))
    inv = torch.empty_like(perm).scatter_(1, perm, idx.contiguous())

    def per_point(v):  # [R, P] by sorted index -> [2R, S] by point (u rows over u - 1 rows)
        w = v.gather(1, inv)
        return torch.cat([w[:, :S], w[:, S:]])

    key_le, key_lt = per_point(run_first), per_point(run_next)
    pos = torch.arange(S, device=dev).expand(2 * R, S)
    small = n <= k  # |C| <= k: every candidate kept, nothing to search
    # Invariant for n > k: f_n(bps[lo]) >= k > f_n(bps[hi]). Holds initially: f_n(min u - 1) = n > k
    # and f_n(max u) = 0.
    lo = torch.zeros(R, S + 1, dtype=torch.long, device=dev)
    hi = torch.full((R, S + 1), P - 1, dtype=torch.long, device=dev)
    hi[:, small] = 1
    for _ in range(P.bit_length()):
        mid = (lo + hi) // 2  # non-decreasing in n, so bps[mid] is too
        ok = _soft_count(x, key_le, pos, cs, n, bps, mid) >= k - F_SLACK
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
        lo[:, small], hi[:, small] = 0, 1
        # The answers are non-decreasing in n, so each prefix may borrow its neighbours' bounds.
        lo = lo.cummax(1).values
        hi = _reverse_cummin(hi)
    b_lo, b_hi = bps.gather(1, lo), bps.gather(1, lo + 1)
    f_lo = _soft_count(x, key_le, pos, cs, n, bps, lo)
    # |F| on the open interval (b_lo, b_hi): prefix entries with u >= b_hi but u - 1 < b_hi.
    below, _ = _prefix_below_int(key_lt, pos, torch.cat([lo + 1, lo + 1]), P + 1)
    found = solve_in_bracket(b_lo, f_lo, below[R:] - below[:R], k, b_hi)
    return torch.where(small, tau, found).cummax(1).values


def prefix_fractional_counts(u: Tensor, tau: Tensor, pu: _Points | None = None) -> Tensor:
    """``|F|(n) = #{l < n : tau(n) < u_l < tau(n) + 1}`` for n = 0..S. [R, S+1] int32.

    This is *the* membership test of F used by every kernel: ``u > tau`` and ``u < tau + 1``,
    with ``tau + 1`` rounded once in float64. Using one test everywhere keeps the score gradient
    consistent when a score sits exactly on a kink (a plateau of f, or ties).
    u: [R, S] finite; tau: [R, S+1] non-decreasing, not NaN.
    """
    pu = _Points.of(u) if pu is None else pu
    at_most_tau = _prefix_below(pu, tau, strict=False)
    below_tau1 = _prefix_below(pu, tau + 1, strict=True)
    return below_tau1 - at_most_tau


def fractional_ranges(tau: Tensor, u64: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Pair l is fractional (``l in F_i``: ``i >= l + window`` and ``tau_i < u_l < tau_i + 1``)
    exactly for the queries ``lo[l] <= i < hi[l]`` (fact 4). ([R, S] int64 each, ``lo <= hi``.)

    tau [R, S] float64 is non-decreasing in i (fact 1), so each of the two tests holds on one
    side of a binary search. Poisoned (NaN) queries form a suffix and are searched as +inf (no
    pair is fractional there); a non-finite score is searched as 0, as the selection ranks it.
    The Triton backward tests F by these ranges (so its |F_i| and its F agree by construction)."""
    S = tau.shape[-1]
    t = torch.nan_to_num(tau, nan=float("inf")).contiguous()
    ul = torch.where(torch.isfinite(u64), u64, 0.0).contiguous()
    lo = torch.searchsorted(t + 1, ul, right=True)  # first i with tau_i + 1 > u_l
    lo = torch.maximum(lo, torch.arange(S, device=tau.device) + window).clamp_max(S)
    hi = torch.searchsorted(t, ul, right=False)  # first i with tau_i >= u_l
    return lo, torch.maximum(hi, lo)


def range_counts(lo: Tensor, hi: Tensor) -> Tensor:
    """``|{l : lo[l] <= i < hi[l]}|`` for every i: [R, S] int64 from lo, hi [R, S] (as
    ``fractional_ranges``). Sorts and searchsorted, no scatter: deterministic."""
    i = torch.arange(lo.shape[-1], device=lo.device).expand_as(lo).contiguous()
    started = torch.searchsorted(torch.sort(lo, dim=-1).values, i, right=True)
    ended = torch.searchsorted(torch.sort(hi, dim=-1).values, i, right=True)
    return started - ended


def sort_desc(u: Tensor) -> Tensor:
    """Positions by descending score, ties to the earlier position. [R, S] int64."""
    return torch.sort(u, dim=1, descending=True, stable=True).indices


def ranks(u: Tensor, order: Tensor | None = None) -> Tensor:
    """Position of every score in the descending order, ties to the earlier position. [R, S] int64."""
    order = sort_desc(u) if order is None else order
    r = torch.empty_like(order)
    r.scatter_(1, order, torch.arange(u.shape[1], device=u.device).expand_as(order).contiguous())
    return r


def prefix_kth_rank(rank: Tensor, k: int) -> Tensor:
    """``kth(n)``: the k-th smallest rank among the first n positions, n = 0..S, and S where
    ``n <= k`` (all candidates selected). [R, S+1] int64, non-increasing in n."""
    R, S = rank.shape
    dev = rank.device
    n = torch.arange(S + 1, device=dev)
    kth = torch.full((R, S + 1), S, dtype=torch.long, device=dev)
    if k == 0 or S <= k:
        return kth
    small = n <= k
    # Smallest R with #{l < n : rank_l <= R} >= k. Invariant: answer in [lo, hi].
    lo = torch.zeros(R, S + 1, dtype=torch.long, device=dev)
    hi = torch.full((R, S + 1), S - 1, dtype=torch.long, device=dev)
    # rank_l <= mid_n  iff  not (S-1-rank_l <= S-2-mid_n), with keys S-1-rank and thresholds
    # S-2-mid, which are non-decreasing in n (mid is non-increasing).
    keys = (S - 1 - rank).contiguous()
    pos = torch.arange(S, device=dev).expand(R, S)
    for _ in range(S.bit_length()):
        lo[:, small] = S - 1
        mid = (lo + hi) // 2  # non-increasing in n
        above, _ = _prefix_below_int(keys, pos, S - 2 - mid, S)
        ok = (n - above) >= k  # #{l < n : rank_l <= mid}
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid + 1)
        hi = hi.cummin(1).values
        lo = _reverse_cummax(lo)
    return torch.where(small, kth, hi)


def eviction(rank: Tensor, kth: Tensor, window: int) -> Tensor:
    """``evict[j]``: queries ``j + window <= i < evict[j]`` select pair j. [R, S] int64.

    Pair j is selected by the prefixes ``j < n < N_j`` where ``N_j`` is the first n with
    ``kth(n) < rank_j`` (kth is non-increasing, so that set of n is a suffix). Query i sees
    the prefix ``n = i + 1 - window``.
    """
    R, S = rank.shape
    first_out = torch.searchsorted((-kth).contiguous(), (-rank).contiguous(), right=True)
    N = torch.maximum(first_out, torch.arange(1, S + 1, device=rank.device))
    return N - 1 + window


def block_lists(evict: Tensor, topk: int, window: int, block_m: int) -> Tensor:
    """Gather list of every block of ``block_m`` queries: the pairs any of its queries selects.

    evict: [R, S]. Returns [R, NB, L] int64, ascending positions padded with -1,
    ``NB = ceil(S / block_m)``, ``L = min(topk + block_m, S)`` (fact 3 bounds the union).
    """
    R, S = evict.shape
    dev = evict.device
    NB = -(-S // block_m)
    L = min(topk + block_m, S) if topk > 0 else 0
    out = torch.full((R * NB, L), -1, dtype=torch.long, device=dev)
    if L == 0 or S == 0:
        return out.view(R, NB, L)
    j = torch.arange(S, device=dev)
    start = j + window  # first query selecting j (if any)
    stop = evict.clamp_max(S)  # one past the last query selecting j
    live = stop > start
    first_b = torch.div(start, block_m, rounding_mode="floor")
    last_b = torch.div(stop - 1, block_m, rounding_mode="floor")
    count = torch.where(live, last_b - first_b + 1, 0).reshape(-1)
    pair = torch.repeat_interleave(torch.arange(R * S, device=dev), count)
    offset = torch.arange(pair.numel(), device=dev) - torch.repeat_interleave(count.cumsum(0) - count, count)
    block = first_b.expand(R, S).reshape(-1)[pair] + offset
    group = torch.div(pair, S, rounding_mode="floor") * NB + block
    # Entries come ordered by (row, position); a stable sort by (row, block) keeps positions ascending.
    group, perm = torch.sort(group, stable=True)
    pos = (pair % S)[perm]
    sizes = torch.bincount(group, minlength=R * NB)
    slot = torch.arange(group.numel(), device=dev) - (sizes.cumsum(0) - sizes)[group]
    out[group, slot] = pos
    return out.view(R, NB, L)


def select(u: Tensor, topk: int, window: int, block_m: int = 64, fractional: bool = True) -> Selection:
    """The whole selection for scores ``u [B, H, S]`` (any float dtype; computed in float64).

    Returns a :class:`Selection` whose tensors have ``R = B * H`` rows. ``fractional=False``
    skips ``n_frac`` (None then), which only the backward needs.
    """
    B, H, S = u.shape
    dev = u.device
    u64 = u.detach().reshape(B * H, S).to(torch.float64)
    bad = ~torch.isfinite(u64)
    uc = torch.where(bad, 0.0, u64)
    n_i = candidate_counts(S, window, dev)
    order = sort_desc(uc)  # one sort serves the ranks and the staircase points
    tau_n = prefix_threshold(uc, topk)
    n_frac = prefix_fractional_counts(uc, tau_n, _Points.of(uc, order))[:, n_i] if fractional else None
    # A non-finite score poisons every prefix that holds it.
    seen_bad = torch.cat([bad.new_zeros(B * H, 1), bad.cumsum(1) > 0], 1)
    tau = torch.where(seen_bad, float("nan"), tau_n)[:, n_i]
    rank = ranks(uc, order)
    kth = prefix_kth_rank(rank, topk)
    evict = eviction(rank, kth, window) if topk > 0 else torch.arange(S, device=dev).expand(B * H, S) + window
    lists = block_lists(evict, topk, window, block_m)
    return Selection(tau, n_frac, evict.contiguous(), lists, topk, window, block_m)
