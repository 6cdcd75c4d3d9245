"""Selection for causal prefixes against a brute-force, query-by-query selection."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsek_ops import reference, selection


def scores(R, S, seed, kind):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        return torch.randint(0, 5, (1, R, S), generator=g).to(torch.float32) * 0.3
    if kind == "plateau":
        return torch.randint(-3, 4, (1, R, S), generator=g).to(torch.float32)
    if kind == "large":
        return torch.randn(1, R, S, generator=g) * 1e4
    return torch.randn(1, R, S, generator=g) * 2


def brute_force(u, topk, window):
    """Per query: tau, the set T_i, |F_i| (u: [S] float64)."""
    S = u.shape[0]
    out = []
    for i in range(S):
        n = max(0, i + 1 - window)
        cand = u[:n]
        if n == 0 or topk == 0:
            out.append((float("-inf"), set(), 0))
            continue
        tau = reference.capped_simplex_threshold(cand, topk).item()
        order = torch.sort(cand, descending=True, stable=True).indices[:topk].tolist()
        n_frac = int(((cand > tau) & (cand < tau + 1)).sum()) if n > topk else 0
        out.append((tau, set(order), n_frac))
    return out


@given(R=st.integers(1, 3), S=st.integers(1, 120), topk=st.integers(0, 40), window=st.integers(0, 20),
       block_m=st.sampled_from([1, 3, 16, 64]), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["normal", "ties", "plateau", "large"]))
def test_selection_matches_brute_force(R, S, topk, window, block_m, seed, kind):
    u = scores(R, S, seed, kind)
    sel = selection.select(u, topk, window, block_m)
    NB = -(-S // block_m)
    assert sel.block_index.shape[:2] == (R, NB)
    for r in range(R):
        ur = u[0, r].double()
        truth = brute_force(ur, topk, window)
        for i, (tau, chosen, n_frac) in enumerate(truth):
            got = sel.tau[r, i].item()
            if tau == float("-inf"):
                assert got == float("-inf")
            else:
                assert abs(got - tau) <= 1e-9 * max(1.0, abs(tau)), (i, got, tau)
                assert sel.n_frac[r, i].item() == n_frac, (i, sel.n_frac[r, i].item(), n_frac)
            by_evict = {j for j in range(S) if j + window <= i < sel.evict[r, j].item()}
            assert by_evict == chosen, (i, sorted(by_evict ^ chosen))
            # Every selected pair has a positive weight (the k-th largest is above tau).
            assert all(ur[j].item() > tau for j in chosen)
        for b in range(NB):
            union = set().union(*(truth[i][1] for i in range(b * block_m, min(S, (b + 1) * block_m))))
            row = sel.block_index[r, b].tolist()
            listed = [j for j in row if j >= 0]
            assert listed == sorted(union)
            assert all(j == -1 for j in row[len(listed):])
            assert len(listed) <= topk + block_m


@given(S=st.integers(2, 400), topk=st.integers(1, 64), window=st.integers(0, 64), seed=st.integers(0, 2**16))
def test_tau_is_monotone_and_evictions_final(S, topk, window, seed):
    u = scores(2, S, seed, "normal")
    sel = selection.select(u, topk, window, 32)
    tau = sel.tau
    assert (tau[:, 1:] >= tau[:, :-1]).all()
    j = torch.arange(S)
    assert (sel.evict >= j + window).all()
    # Selected pairs per query never exceed topk.
    for r in range(2):
        counts = torch.zeros(S + window + 1, dtype=torch.long)
        for jj in range(S):
            lo, hi = jj + window, min(S, sel.evict[r, jj].item())
            if hi > lo:
                counts[lo:hi] += 1
        assert counts.max() <= topk


def test_non_finite_scores_poison_only_the_queries_that_see_them():
    u = torch.randn(1, 2, 50)
    u[0, 0, 20] = float("nan")
    u[0, 1, 30] = float("inf")
    for window in (0, 5):
        sel = selection.select(u, 4, window, 16)
        i = torch.arange(50)
        for r, bad in ((0, 20), (1, 30)):
            sees = i >= bad + window
            assert sel.tau[r, sees].isnan().all()
            assert not sel.tau[r, ~sees].isnan().any()
            clean = u.clone()
            clean[0, r, bad] = 0.0
            ref = selection.select(clean, 4, window, 16)
            assert torch.equal(sel.tau[r, ~sees], ref.tau[r, ~sees])


def test_selection_memory_is_linear():
    """No S x S or S x topk tensor: every tensor of the result is O(S) per row (the gather
    lists are NB x (topk + block_m))."""
    S, topk, bm = 4096, 256, 64
    sel = selection.select(torch.randn(1, 1, S), topk, 256, bm)
    assert sel.tau.numel() == S and sel.evict.numel() == S and sel.n_frac.numel() == S
    assert sel.block_index.numel() == (S // bm) * (topk + bm)


@given(R=st.integers(1, 3), S=st.integers(1, 150), topk=st.integers(1, 40), window=st.integers(0, 20),
       seed=st.integers(0, 2**16), kind=st.sampled_from(["normal", "ties", "plateau", "large"]))
def test_fractional_ranges_are_the_elementwise_test(R, S, topk, window, seed, kind):
    """``lo[l] <= i < hi[l]`` iff ``i >= l + window`` and ``tau_i < u_l < tau_i + 1`` (the float64
    test per pair and query), and ``range_counts`` is |F_i| as the selection counts it."""
    u = scores(R, S, seed, kind)
    sel = selection.select(u, topk, window, 16, fractional=True)
    u64 = u.reshape(R, S).double()
    lo, hi = selection.fractional_ranges(sel.tau, u64, window)
    i = torch.arange(S)[None, :, None]
    ell = torch.arange(S)[None, None, :]
    tau = sel.tau[:, :, None]
    want = (ell + window <= i) & (u64[:, None, :] > tau) & (u64[:, None, :] < tau + 1)
    got = (lo[:, None, :] <= i) & (i < hi[:, None, :])
    assert torch.equal(got, want)
    assert torch.equal(selection.range_counts(lo, hi), sel.n_frac.long())


@given(R=st.integers(1, 3), S=st.integers(1, 150), topk=st.integers(1, 40), window=st.integers(0, 20),
       seed=st.integers(0, 2**16), kind=st.sampled_from(["normal", "ties", "plateau", "large"]),
       slope=st.sampled_from([0.0, 0.05, -0.05]))
def test_slots_are_chains_of_the_selection(R, S, topk, window, seed, kind, slope):
    """Fact 6's slots (kernels/slots.py): every pair ever selected has one slot in [0, NL); the
    pairs of a slot use consecutive, disjoint query ranges from its first pair's entry to S."""
    from sparsek_ops.kernels.slots import slot_of

    u = scores(R, S, seed, kind) + slope * torch.arange(S)
    evict = selection.select(u, topk, window, 16, fractional=False).evict.clamp_max(S)
    slot, nl = slot_of(evict, topk, window)
    assert nl == max(0, min(topk, S - window))
    j = torch.arange(S)
    for r in range(R):
        chosen = evict[r] > j + window
        assert torch.equal(slot[r] >= 0, chosen)
        assert ((slot[r][chosen] >= 0) & (slot[r][chosen] < nl)).all()
        for s in range(nl):
            pairs = j[slot[r] == s]
            starts, ends = pairs + window, evict[r][pairs]
            assert starts[0] < S and torch.equal(starts[1:], ends[:-1]) and ends[-1] == S, (r, s)
