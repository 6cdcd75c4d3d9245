"""The Triton selection (sparsek_ops/kernels/selection.py) against the PyTorch one.

Both must agree exactly on who is selected (eviction indices, the set of every gather list)
and on tau up to float64 rounding; |F| comes from the same PyTorch function in both. On CPU the
kernels run in Triton's interpreter (slow: the walk is sequential), so sizes stay small there;
the `gpu` twins run at long sequences and also check that no host synchronisation happens.
"""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsek_ops import backends, selection

pytestmark = pytest.mark.skipif("triton" not in backends.names(), reason="triton is not installed")


def gsel():
    from sparsek_ops.kernels import selection as g
    return g


@pytest.fixture(autouse=True)
def small_tiles_in_the_interpreter(monkeypatch):
    """The interpreter pays for every tile element: small chunk-start tiles there."""
    if not torch.cuda.is_available() and "triton" in backends.names():
        monkeypatch.setattr(gsel(), "START_BLOCK", 64)


def scores(kind: str, R: int, S: int, seed: int, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        pool = torch.rand(4, generator=g, dtype=torch.float64) * 0.9
        u = pool[torch.randint(0, 4, (1, R, S), generator=g)]
    elif kind == "plateau":
        u = torch.randint(-3, 4, (1, R, S), generator=g).double()
    elif kind == "large":
        u = torch.randn(1, R, S, generator=g, dtype=torch.float64) * 1e4
    else:
        u = torch.randn(1, R, S, generator=g, dtype=torch.float64) * 2
    return u.float().to(device)


def assert_same_selection(u, topk, window, block_m, frac_by_test=True):
    """The Triton selection of u equals the PyTorch one. |F| is checked against the F test on
    the Triton tau (frac_by_test; an [R, S, S] tensor, so short rows only), else against the
    PyTorch selection's |F|."""
    a = selection.select(u.cpu(), topk, window, block_m)
    b = gsel().select(u, topk, window, block_m)
    fin = torch.isfinite(a.tau)
    tau_b = b.tau.cpu()
    assert torch.equal(fin, torch.isfinite(tau_b)) and torch.equal(a.tau.isnan(), tau_b.isnan())
    if fin.any():
        scale = max(1.0, a.tau[fin].abs().max().item())
        assert (a.tau[fin] - tau_b[fin]).abs().max().item() <= 1e-9 * scale
    assert torch.equal(a.evict, b.evict.cpu().long())
    assert a.block_index.shape == b.block_index.shape
    # Same set per block (the Triton lists are in rank order, then position order).
    la = a.block_index.sort(-1, descending=True).values
    lb = b.block_index.cpu().long().sort(-1, descending=True).values
    assert torch.equal(la, lb)
    if not frac_by_test:
        assert torch.equal(a.n_frac.long(), b.n_frac.cpu().long())
    # |F| must agree with the F test on b's own tau (what the kernels use).
    elif b.n_frac is not None:
        S = u.shape[-1]
        n = selection.candidate_counts(S, window)
        uu = torch.where(torch.isfinite(u.cpu().double()), u.cpu().double(), 0.0).reshape(-1, 1, S)
        t = tau_b.reshape(-1, S, 1)
        inF = (uu > t) & (uu < t + 1) & (torch.arange(S)[None, None, :] < n[None, :, None])
        ok = tau_b.reshape(-1, S).isfinite()
        assert torch.equal(torch.where(ok, inF.sum(-1), 0), torch.where(ok, b.n_frac.cpu().long().reshape(-1, S), 0))


def _cpu_only():
    if torch.cuda.is_available():
        pytest.skip("the interpreter runs only where there is no GPU; see the gpu tests")


@pytest.mark.parametrize("kind", ["normal", "ties", "plateau", "large"])
@pytest.mark.parametrize("S,topk,window,block_m,block,group", [(150, 7, 3, 8, 16, 2), (97, 40, 0, 16, 32, 64),
                                                               (64, 70, 2, 4, 16, 1), (33, 1, 5, 64, 512, 64)])
def test_interpreter_matches_pytorch_selection(monkeypatch, kind, S, topk, window, block_m, block, group):
    _cpu_only()
    g = gsel()
    # Short chunks, so that the walk crosses many chunk starts even at these sizes; chunk starts
    # on sorted blocks of 16 or 32 positions (many full blocks, searched 1, 2 or 64 at a time,
    # and a partial one) or 512 (the partial block alone).
    monkeypatch.setattr(g, "LIVE_PER_CHUNK", 5)
    monkeypatch.setattr(g, "START_BLOCK", block)
    monkeypatch.setattr(g, "START_GROUP", group)
    g._chunk_starts.cache_clear()
    g.chunk_starts.cache_clear()
    try:
        assert_same_selection(scores(kind, 2, S, seed=S + topk), topk, window, block_m)
    finally:
        g._chunk_starts.cache_clear()
        g.chunk_starts.cache_clear()


def test_interpreter_long_row_start_config(monkeypatch):
    """The chunk starts' long-row configuration (START_LONG_*), forced at a short length."""
    _cpu_only()
    g = gsel()
    monkeypatch.setattr(g, "START_LONG_FROM", 1)
    monkeypatch.setattr(g, "START_LONG_BLOCK", 32)
    monkeypatch.setattr(g, "START_LONG_GROUP", 2)
    monkeypatch.setattr(g, "LIVE_PER_CHUNK", 5)
    assert_same_selection(scores("ties", 2, 150, seed=9), 7, 3, 8)


@pytest.mark.parametrize("tb", [16, 64])
def test_interpreter_walk_tiles(monkeypatch, tb):
    """The walk with other tiles of prefixes (WALK_TB; 32 elsewhere), for bench/gpu_selection.py
    --walk: the same selection."""
    _cpu_only()
    g = gsel()
    monkeypatch.setattr(g, "WALK_TB", tb)
    monkeypatch.setattr(g, "LIVE_PER_CHUNK", 9)
    for kind in ("normal", "ties"):
        assert_same_selection(scores(kind, 2, 170, seed=tb), 12, 5, 8)


def test_interpreter_nan_topk0_and_tiny():
    _cpu_only()
    u = scores("normal", 1, 40, seed=1)
    u[0, 0, 17] = float("nan")
    assert_same_selection(u, 5, 2, 8)
    assert_same_selection(scores("normal", 1, 30, seed=2), 0, 4, 8)
    assert_same_selection(scores("normal", 1, 1, seed=3), 1, 0, 64)


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "extremes"])
def test_rank_order_is_a_stable_descending_sort(monkeypatch, kind):
    """rank_order (one flat sort of bit keys) = torch.sort's stable descending order, on several
    rows, with ties, signed zeros (equal), denormals and the largest finite floats."""
    g = torch.Generator().manual_seed(7)
    R, S = 3, 500
    if kind == "extremes":
        pool = torch.tensor([3.4e38, -3.4e38, 1e-45, -1e-45, 0.0, -0.0, 1.0, -1.0, 1.5e-38])
        x = pool[torch.randint(0, len(pool), (R, S), generator=g)]
    elif kind == "zeros":
        x = torch.where(torch.rand(R, S, generator=g) < 0.5, -0.0, 0.0)
    else:
        x = torch.randn(R, S, generator=g)
        if kind == "ties":
            x = (x * 3).round() / 2
    want = torch.sort(x, dim=1, descending=True, stable=True).indices.to(torch.int32)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # pure PyTorch: runs on both
    monkeypatch.setattr(gsel(), "FLAT_SORT_FROM", 1)  # the flat sort, at any length
    assert torch.equal(gsel().rank_order(x.to(dev)).cpu(), want)


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_interpreter_score_dtypes(monkeypatch, dtype, flat):
    """Scores of every dtype give PyTorch's selection (bfloat16 and float16 ranked as float32,
    float64 by its own sort), ties included (bfloat16 rounding makes many); rows sorted flat
    (as long rows are) or one by one."""
    _cpu_only()
    if flat:
        monkeypatch.setattr(gsel(), "FLAT_SORT_FROM", 1)
    assert_same_selection(scores("normal", 2, 120, seed=5).to(dtype), 9, 4, 8)


@settings(max_examples=8)
@given(S=st.integers(1, 90), topk=st.integers(1, 50), window=st.integers(0, 8),
       block_m=st.sampled_from([1, 2, 8, 32]), kind=st.sampled_from(["normal", "ties", "plateau"]),
       seed=st.integers(0, 1000))
def test_interpreter_property(S, topk, window, block_m, kind, seed):
    _cpu_only()
    g = gsel()
    # Sorted blocks of 16 positions, two searched at a time: at these sizes the chunk starts
    # meet full blocks, several groups and a partial block.
    with mock.patch.object(g, "START_BLOCK", 16), mock.patch.object(g, "START_GROUP", 2):
        assert_same_selection(scores(kind, 1, S, seed), topk, window, block_m)


def test_chunk_starts_cover_every_prefix_and_start_at_k_plus_1():
    g = gsel()
    for S, k in [(10, 3), (5000, 64), (32768, 1024), (100, 200)]:
        for live in (5, 32, 256):
            st_ = g._chunk_starts(S, k, live)
            assert st_[0] == 0 and list(st_) == sorted(set(st_)) and st_[-1] <= S
            if k + 1 <= S:
                assert k + 1 in st_


def test_live_per_chunk_follows_the_row_count(monkeypatch):
    """Many rows: long chunks (few programs each row); few rows: the shortest rung. The chosen
    rung gives at least WALK_PROGRAMS programs, the next longer one fewer; LIVE_PER_CHUNK wins."""
    g = gsel()
    S, k = 32768, 1024
    ladder = g.LIVE_LADDER
    assert g.live_per_chunk(S, k, 2) == min(ladder)
    assert g.live_per_chunk(S, k, 100000) == max(ladder)
    live = g.live_per_chunk(S, k, 16)
    n_chunks = lambda n: len(g._chunk_starts(S, k, n)) - 1  # noqa: E731
    assert 16 * n_chunks(live) >= g.WALK_PROGRAMS
    longer = [n for n in ladder if n > live]
    assert not longer or 16 * n_chunks(min(longer)) < g.WALK_PROGRAMS
    monkeypatch.setattr(g, "LIVE_PER_CHUNK", 7)
    assert g.live_per_chunk(S, k, 16) == 7


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["normal", "ties", "plateau", "large"])
@pytest.mark.parametrize("S,topk,window,block_m", [(4096, 256, 256, 64), (20000, 1024, 1024, 8), (3000, 2999, 0, 16)])
def test_gpu_matches_pytorch_selection(kind, S, topk, window, block_m):
    assert_same_selection(scores(kind, 3, S, seed=S, device="cuda"), topk, window, block_m)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_gpu_long_rows_match_pytorch_selection(kind):
    """Rows of 64K: the flat sorts and the long rows' chunk-start blocks (START_LONG_*)."""
    S = 65536
    assert S >= gsel().START_LONG_FROM and S >= gsel().FLAT_SORT_FROM
    assert_same_selection(scores(kind, 2, S, seed=S, device="cuda"), 1024, 1024, 64, frac_by_test=False)


@pytest.mark.gpu
@pytest.mark.parametrize("S", [1, 2, 3, 17])
@pytest.mark.parametrize("topk,window", [(1, 0), (2, 1), (5, 3)])
def test_gpu_tiny_sequences(S, topk, window):
    """Sizes of 1 are specialised to constants by Triton; they once broke a compiler pass."""
    assert_same_selection(scores("normal", 2, S, seed=S, device="cuda"), topk, window, 8)


@pytest.mark.gpu
def test_gpu_selection_never_syncs_with_the_host():
    g = gsel()
    u = scores("normal", 4, 8192, seed=0, device="cuda")
    g.select(u, 512, 512, 64)  # warm up: compile, cache the chunk starts
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        g.select(u, 512, 512, 64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
