"""Backend "triton" (the Triton forward; gradients through the Triton backward) against the float64 reference.

On CPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), in float32 and
float16 only: the interpreter computes bfloat16 dots wrongly (triton issue 11584), and it runs
programs one after another, so it can say nothing about races. The interpreter tests use small
tiles (``SMALL``) so that short sequences still cover many query blocks, several chunks per
gather list and all three runs of the window span (masked edges, unmasked middle). The `gpu`
tests run on CUDA with the kernel's own configs.
"""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsek_ops
from sparsek_ops import reference, selection
from helpers import Problem, assert_within_model, launch_config, needs_interpreter
from test_attention import check_against_reference, problems

pytestmark = pytest.mark.skipif("triton" not in sparsek_ops.backends.names(), reason="triton is not installed")

if "triton" in sparsek_ops.backends.names():
    from sparsek_ops.kernels import forward as fwd

    # (block_m, block_n, warps, stages[, lazy_rescale]): block_m is raised to a power of two >= G
    # by rows_per_tile.
    SMALL = [fwd.Config(16, 16, 4, 1), fwd.Config(32, 16, 4, 1, lazy_rescale=True), fwd.Config(64, 32, 4, 1)]


@needs_interpreter
@settings(max_examples=14)
@given(prob=problems(dtypes=(torch.float32, torch.float16), max_s=70), cfg=st.sampled_from([0, 1, 2]))
def test_interpreter_matches_reference(prob, cfg):
    with launch_config(fwd, SMALL[cfg]):
        check_against_reference(prob, "triton")


# (B, G, Hkv, S, D, Dv, topk, window, dtype, config index, contiguous): each line aims at one
# feature; together they cover the group sizes 1, 2, 3, 4, 8, D != Dv, D = 16 and 256, S not a
# multiple of the block, topk = 0, window = 0, topk >= S and non-contiguous inputs.
CASES = {
    "G1": (1, 1, 2, 97, 32, 32, 9, 20, torch.float32, 0, True),
    "G2": (2, 2, 1, 83, 24, 16, 6, 17, torch.float16, 1, True),
    "G3": (1, 3, 2, 80, 24, 40, 12, 9, torch.float32, 0, True),
    "G4_fp16": (1, 4, 1, 90, 64, 32, 7, 30, torch.float16, 1, True),
    "G8_rows_past_block": (1, 8, 1, 50, 16, 16, 5, 4, torch.float32, 0, True),  # BMQ = 2
    "D16": (1, 2, 1, 61, 16, 16, 8, 8, torch.float32, 2, True),
    "D256_Dv64": (1, 2, 1, 70, 256, 64, 10, 12, torch.float16, 2, True),
    "D8_Dv256": (1, 1, 1, 45, 8, 256, 6, 5, torch.float32, 1, True),
    "D40_Dv24_strided": (2, 2, 2, 77, 40, 24, 11, 13, torch.float32, 0, False),
    "topk0": (1, 2, 2, 75, 32, 32, 0, 11, torch.float32, 0, True),
    "window0": (1, 3, 1, 66, 32, 16, 10, 0, torch.float16, 0, True),
    "window1": (1, 2, 1, 47, 16, 16, 4, 1, torch.float32, 0, True),
    "topk_ge_S": (1, 2, 1, 40, 32, 32, 45, 0, torch.float32, 0, True),
    "topk_ge_S_window": (1, 1, 2, 37, 32, 24, 37, 6, torch.float16, 1, True),
    "window_ge_S": (1, 2, 1, 33, 16, 32, 3, 50, torch.float32, 2, True),
    "S1": (1, 2, 1, 1, 32, 32, 1, 1, torch.float32, 0, True),
    "long_lists_full_chunks": (1, 2, 1, 300, 16, 16, 40, 16, torch.float32, 0, True),  # chunks with no mask too
    "default_tiles": (1, 4, 2, 150, 64, 64, 20, 24, torch.float16, None, True),
}


@needs_interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_interpreter_cases(case):
    B, G, Hkv, S, D, Dv, topk, window, dtype, cfg, contiguous = CASES[case]
    prob = Problem(B, G * Hkv, Hkv, S, D, Dv, topk, window, dtype, contiguous=contiguous, seed=len(case) + S)
    with launch_config(fwd, None if cfg is None else SMALL[cfg]):
        check_against_reference(prob, "triton")


@needs_interpreter
@pytest.mark.parametrize("scores", ["ties", "large", "plateau"])
def test_interpreter_score_kinds(scores):
    prob = Problem(1, 2, 1, 90, 16, 16, 8, 10, torch.float32, scores=scores, seed=5)
    with launch_config(fwd, SMALL[0]):
        check_against_reference(prob, "triton")


@needs_interpreter
@pytest.mark.parametrize("u_dtype", [torch.bfloat16, torch.float64])
def test_interpreter_score_dtypes(u_dtype):
    q, k, v, u = Problem(1, 2, 1, 60, 16, 16, 6, 7, torch.float32, seed=2).make()
    u = u.to(u_dtype)
    with launch_config(fwd, SMALL[0]):
        out, lse = sparsek_ops.sparsek_attention(q, k, v, u, topk=6, window=7, return_lse=True, backend="triton")
    r_out, r_lse = reference.attention(q.double(), k.double(), v.double(), u.double(), 6, 7)
    torch.testing.assert_close(out.double(), r_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), r_lse, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("window", [0, 4])
def test_non_finite_score_poisons_exactly_the_queries_that_see_it(bad, window):
    """The queries that have the bad score among their candidates come out NaN; every other
    output, including queries of the same block whose gather list holds the bad pair, is as
    with a clean score. Scores are negative so that the bad one (0 for the selection) is picked."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    S, pos, topk = 64, 21, 5
    q, k, v, u = Problem(1, 4, 2, S, 16, 16, topk, window, torch.float32, seed=3, device=device).make()
    u = -u.abs() - 1
    u_bad = u.clone()
    u_bad[0, 0, pos] = bad
    with launch_config(fwd, SMALL[0] if device == "cpu" else None):
        out, lse = sparsek_ops.sparsek_attention(q, k, v, u_bad, topk=topk, window=window, return_lse=True,
                                                 backend="triton")
    r_out, r_lse = reference.attention(*(x.cpu().double() for x in (q, k, v, u_bad)), topk, window)
    sees = torch.arange(S) >= pos + window
    assert out[0, :2, sees].isnan().all() and lse[0, :2, sees].isnan().all()
    assert torch.equal(out.cpu().isnan(), r_out.isnan()) and torch.equal(lse.cpu().isnan(), r_lse.isnan())
    torch.testing.assert_close(out.cpu().double().nan_to_num(), r_out.nan_to_num(), rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double().nan_to_num(), r_lse.nan_to_num(), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ the shared helpers
if "triton" in sparsek_ops.backends.names():
    import triton
    import triton.language as tl

    from sparsek_ops.kernels import common

    @triton.jit
    def _list_bound_kernel(LISTS, OUT, L, NSAMP: tl.constexpr):
        i = tl.program_id(0)
        tl.store(OUT + i, common.list_bound(LISTS + i * L, L, NSAMP))

    @triton.jit
    def _window_parts_kernel(OUT, S, window, BMQ: tl.constexpr, BN: tl.constexpr):
        i = tl.program_id(0)
        a, b, c, d = common.window_parts(i * BMQ, BMQ, S, window, BN)
        tl.store(OUT + 4 * i + tl.arange(0, 4), tl.where(tl.arange(0, 4) == 0, a, tl.where(
            tl.arange(0, 4) == 1, b, tl.where(tl.arange(0, 4) == 2, c, d))))


@needs_interpreter
@pytest.mark.parametrize("L,nsamp", [(1, 4), (37, 8), (100, 128), (300, 16)])
def test_list_bound_is_a_tight_upper_bound(L, nsamp):
    n = torch.tensor(sorted({0, 1, L // 3, L - 1, L}))
    lists = torch.where(torch.arange(L) < n[:, None], torch.arange(L) * 3, -1)
    out = torch.empty(len(n), dtype=torch.int32)
    _list_bound_kernel[(len(n),)](lists, out, L, nsamp)
    stride = -(-L // nsamp)
    assert ((out >= n) & (out < n + stride) & (out <= L)).all(), (n, out)


@needs_interpreter
@pytest.mark.parametrize("S,window,BMQ,BN", [(100, 1, 16, 16), (100, 7, 8, 16), (130, 40, 16, 16), (90, 200, 32, 32),
                                            (50, 16, 4, 32), (77, 33, 1, 16)])
def test_window_parts_split_the_span(S, window, BMQ, BN):
    NB = -(-S // BMQ)
    out = torch.empty(NB, 4, dtype=torch.int32)
    _window_parts_kernel[(NB,)](out, S, window, BMQ, BN)
    for blk, (a, b, c, d) in enumerate(out.tolist()):
        i0 = blk * BMQ
        queries = range(i0, min(i0 + BMQ, S))
        seen = {j for i in queries for j in range(max(0, i - window + 1), i + 1)}
        assert a == max(0, i0 - window + 1) and d == min(i0 + BMQ, S)
        assert a <= b <= c and (b - a) % BN == 0 and (c - b) % BN == 0
        assert seen <= set(range(a, max(c, d)))
        for j in range(b, c):  # the unmasked middle: every query of the block sees it
            assert all(i - window < j <= i for i in range(i0, i0 + BMQ)), (blk, j)


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@given(prob=problems(max_s=200, device="cuda"))
def test_triton_on_cuda_matches_reference(prob):
    check_against_reference(prob, "triton")


def _dense_from_selection(q, k, v, u, topk, window, scale, dtype):
    """out, lse of DESIGN.md section 2 computed densely in ``dtype`` (torch matmuls, no TF32) from
    the PyTorch selection: the weights of reference.attention without its O(S^3) threshold
    search (the selection is tested against it in test_selection.py)."""
    B, Hq, S, _ = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    i = torch.arange(S, device=q.device)[:, None]
    j = torch.arange(S, device=q.device)[None, :]
    win = (j <= i) & (j > i - window)
    if topk > 0:
        sel = selection.select(u, topk, window, 64, fractional=False)
        tau = sel.tau.view(B, Hkv, S, 1)
        ev = sel.evict.view(B, Hkv, 1, S)
        chosen = (j + window <= i) & (i < ev)
        p = ((u.double().view(B, Hkv, 1, S) - tau).clamp(0, 1)).where(tau > float("-inf"), 1.0)
        p = torch.where(chosen, p, 0.0)
    else:
        chosen = torch.zeros(B, Hkv, S, S, dtype=torch.bool, device=q.device)
        p = torch.zeros(B, Hkv, S, S, dtype=torch.float64, device=q.device)
    p = torch.where(win, 1.0, p).repeat_interleave(G, 1).to(dtype)
    mask = (chosen | win).repeat_interleave(G, 1)
    kd, vd = (x.repeat_interleave(G, 1).to(dtype) for x in (k, v))
    s = (scale * p * (q.to(dtype) @ kd.transpose(-1, -2))).masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) * p) @ vd, torch.logsumexp(s, -1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("topk,window", [(256, 128), (0, 200), (300, 0)])
def test_triton_on_cuda_larger_shape(dtype, topk, window):
    """S = 2048, Hq = 8, Hkv = 2, D = 128 with the kernel's own configs, in the tolerance model
    of DESIGN.md section 5 (dense same-dtype and float64 computations from the same selection)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    prob = Problem(1, 8, 2, 2048, 128, 128, topk, window, dtype, seed=11, device="cuda")
    q, k, v, u = prob.make()
    out, lse = sparsek_ops.sparsek_attention(q, k, v, u, topk=topk, window=window, return_lse=True, backend="triton")
    out64, lse64 = _dense_from_selection(q, k, v, u, topk, window, prob.scale, torch.float64)
    outl, lsel = _dense_from_selection(q, k, v, u, topk, window, prob.scale, dtype)
    assert_within_model("out", out.cpu(), out64.cpu(), outl.cpu(), dtype)
    assert_within_model("lse", lse.cpu(), lse64.cpu(), lsel.cpu(), dtype)


@pytest.mark.gpu
def test_triton_on_cuda_strided_gqa():
    """Inputs in [B, S, H, D] memory order (the usual projection layout) give the same result as
    contiguous ones, bit for bit."""
    prob = Problem(2, 16, 2, 1000, 128, 64, 128, 128, torch.bfloat16, seed=4, device="cuda")
    q, k, v, u = prob.make()
    a = sparsek_ops.sparsek_attention(q, k, v, u, topk=128, window=128, backend="triton")
    qs, ks, vs = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    b = sparsek_ops.sparsek_attention(qs, ks, vs, u, topk=128, window=128, backend="triton")
    assert torch.equal(a, b)
