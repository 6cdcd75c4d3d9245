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
``l < n`` of the points below ``t_n``" (a 2-D dominance query), into one ``searchsorted``
per point, a ``scatter_add`` and a ``cumsum`` (``_prefix_below``). Total O(S log^2 S)
work and O(S) memory per head; no S x S and no S x topk tensor, no Python loop over positions.

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
    n_frac:      [R, S] int64, |F_i|, the number of fractional candidates of query i
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


def _prefix_below(pts: _Points, t: Tensor, strict: bool = False, weighted: bool = True):
    """For every prefix length ``n = 0..S``: how many points ``l < n`` have ``x[l] <= t[n]``
    (``< t[n]`` if ``strict``), and the sum of those ``x[l]``.

    t: [R, S+1] thresholds, non-decreasing in n. Since t is monotone, point l is counted by
    exactly the n >= max(l + 1, first n whose threshold admits it): one searchsorted per
    point, then a histogram and a cumsum. This is the whole trick of the selection.
    Returns (count [R, S+1] int64, sum [R, S+1] of x.dtype or None).
    """
    R, S = pts.xs.shape
    first = torch.searchsorted(t, pts.xs, right=strict)
    start = torch.maximum(first, pts.pos + 1)
    count = torch.zeros(R, S + 2, dtype=torch.long, device=t.device)
    count.scatter_add_(1, start, torch.ones_like(start))
    count = count.cumsum(1)[:, : S + 1]
    if not weighted:
        return count, None
    total = pts.xs.new_zeros(R, S + 2).scatter_add_(1, start, pts.xs)
    return count, total.cumsum(1)[:, : S + 1]


def _prefix_sums(x: Tensor) -> Tensor:
    return torch.cat([x.new_zeros(x.shape[0], 1), x.cumsum(1)], 1)


def _soft_count(pts: _Points, cs: Tensor, n: Tensor, t: Tensor) -> Tensor:
    """``f_n(t_n) = sum_{l < n} clip(u_l - t_n, 0, 1)`` for every n (t [R, S+1] non-decreasing in n),
    written as ``G(u) - G(u - 1)`` with ``G(x) = sum_{l < n, x_l > t} (x_l - t)``.

    pts: the points of u stacked over those of u - 1 ([2R, S]); cs their prefix sums [2R, S+1].
    Both halves go through one ``_prefix_below`` call."""
    t2 = torch.cat([t, t])
    cnt_le, sum_le = _prefix_below(pts, t2)
    g = (cs - sum_le) - t2 * (n - cnt_le)
    R = t.shape[0]
    return g[:R] - g[R:]


def _reverse_cummin(x: Tensor) -> Tensor:
    return x.flip(1).cummin(1).values.flip(1)


def _reverse_cummax(x: Tensor) -> Tensor:
    return x.flip(1).cummax(1).values.flip(1)


def prefix_threshold(u: Tensor, k: int, pu: _Points | None = None) -> Tensor:
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
    cs = _prefix_sums(torch.cat([u, u - 1]))
    pu = _Points.of(u) if pu is None else pu
    pts = _Points(torch.cat([pu.xs, pu.xs - 1]), torch.cat([pu.pos, pu.pos]))  # u over u - 1
    bps = torch.cat([pu.xs - 1, pu.xs], 1).sort(1).values.contiguous()  # [R, P], P = 2S
    P = 2 * S
    small = n <= k  # |C| <= k: every candidate kept, nothing to search
    # Invariant for n > k: f_n(bps[lo]) >= k > f_n(bps[hi]). Holds initially: f_n(min u - 1) = n > k
    # and f_n(max u) = 0.
    lo = torch.zeros(R, S + 1, dtype=torch.long, device=dev)
    hi = torch.full((R, S + 1), P - 1, dtype=torch.long, device=dev)
    hi[:, small] = 1
    for _ in range(P.bit_length()):
        mid = (lo + hi) // 2  # non-decreasing in n, so bps[mid] is too
        ok = _soft_count(pts, cs, n, bps.gather(1, mid)) >= k - F_SLACK
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
        lo[:, small], hi[:, small] = 0, 1
        # The answers are non-decreasing in n, so each prefix may borrow its neighbours' bounds.
        lo = lo.cummax(1).values
        hi = _reverse_cummin(hi)
    b_lo, b_hi = bps.gather(1, lo), bps.gather(1, lo + 1)
    f_lo = _soft_count(pts, cs, n, b_lo)
    # |F| on the open interval (b_lo, b_hi): prefix entries with u >= b_hi but u - 1 < b_hi.
    below, _ = _prefix_below(pts, torch.cat([b_hi, b_hi]), strict=True, weighted=False)
    found = solve_in_bracket(b_lo, f_lo, below[R:] - below[:R], k, b_hi)
    return torch.where(small, tau, found).cummax(1).values


def prefix_fractional_counts(u: Tensor, tau: Tensor, pu: _Points | None = None) -> Tensor:
    """``|F|(n) = #{l < n : tau(n) < u_l < tau(n) + 1}`` for n = 0..S. [R, S+1] int64.

    This is *the* membership test of F used by every kernel: ``u > tau`` and ``u < tau + 1``,
    with ``tau + 1`` rounded once in float64. Using one test everywhere keeps the score gradient
    consistent when a score sits exactly on a kink (a plateau of f, or ties).
    u: [R, S] finite; tau: [R, S+1] non-decreasing, not NaN.
    """
    pu = _Points.of(u) if pu is None else pu
    at_most_tau, _ = _prefix_below(pu, tau, strict=False, weighted=False)
    below_tau1, _ = _prefix_below(pu, tau + 1, strict=True, weighted=False)
    return below_tau1 - at_most_tau


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
    # Points (l, -rank_l) sorted by value: rank S-1 first, i.e. positions in reverse rank order.
    order = torch.empty_like(rank).scatter_(1, rank, torch.arange(S, device=dev).expand_as(rank).contiguous())
    neg_rank = _Points(torch.arange(-(S - 1), 1, device=dev).expand(R, S), order.flip(1))
    for _ in range(S.bit_length()):
        lo[:, small] = S - 1
        mid = (lo + hi) // 2  # non-increasing in n, so -mid is non-decreasing
        # #{l < n : rank_l <= mid} = n - #{l < n : -rank_l < -mid}
        above, _ = _prefix_below(neg_rank, -mid, strict=True, weighted=False)
        ok = (n - above) >= k
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


def select(u: Tensor, topk: int, window: int, block_m: int = 64) -> Selection:
    """The whole selection for scores ``u [B, H, S]`` (any float dtype; computed in float64).

    Returns a :class:`Selection` whose tensors have ``R = B * H`` rows.
    """
    B, H, S = u.shape
    dev = u.device
    u64 = u.detach().reshape(B * H, S).to(torch.float64)
    bad = ~torch.isfinite(u64)
    uc = torch.where(bad, 0.0, u64)
    n_i = candidate_counts(S, window, dev)
    order = sort_desc(uc)  # one sort serves the ranks and the staircase points
    pts = _Points.of(uc, order)
    tau_n = prefix_threshold(uc, topk, pts)
    frac_n = prefix_fractional_counts(uc, tau_n, pts)
    # A non-finite score poisons every prefix that holds it.
    seen_bad = torch.cat([bad.new_zeros(B * H, 1), bad.cumsum(1) > 0], 1)
    tau_n = torch.where(seen_bad, float("nan"), tau_n)
    tau = tau_n[:, n_i]
    n_frac = frac_n[:, n_i]
    rank = ranks(uc, order)
    kth = prefix_kth_rank(rank, topk)
    evict = eviction(rank, kth, window) if topk > 0 else torch.arange(S, device=dev).expand(B * H, S) + window
    lists = block_lists(evict, topk, window, block_m)
    return Selection(tau, n_frac, evict.contiguous(), lists, topk, window, block_m)
