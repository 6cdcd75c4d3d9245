"""The Triton backward (sparsek_ops/kernels/backward.py, slots.py) against the float64 reference
(tolerance model of DESIGN.md section 5) and against ``cpu.backward``.

On CPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), in float32 and
float16 only: the interpreter computes bfloat16 dots wrongly (triton issue 11584) and runs
programs one after another, so it says nothing about races. The slot sweep is exercised with
several query segments (``n_segments``), so the sums parked between segments are checked too.
The `gpu` tests run the property suite on CUDA (bfloat16 included) and check that repeated runs
are bitwise identical there.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsek_ops
from sparsek_ops import cpu
from helpers import Problem, assert_within_model, count_calls, max_err, reference_run
from test_attention import check_against_reference, problems

pytestmark = pytest.mark.skipif("triton" not in sparsek_ops.backends.names(), reason="triton is not installed")
interpreter = pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="the interpreter runs only where there is no GPU; see the gpu tests")

# Distance to cpu.backward (which computes half precision in float32), relative to the size of
# its values: float32 dots are IEEE in both; float16 dots here round ds, a * p to float16.
TO_TORCH = {torch.float32: 2e-5, torch.float16: 5e-3}


def triton_backward(*args, **kwargs):
    from sparsek_ops.kernels import backward

    return backward.backward(*args, **kwargs)


def close_to_torch(name, got, want, dtype):
    mag = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    err = max_err(got, want)
    assert err <= TO_TORCH[dtype] * mag, f"{name}: {err:.3g} from cpu.backward (allowed {TO_TORCH[dtype] * mag:.3g})"


def backward_inputs(prob: Problem, glse: bool = True, u=None):
    """q, k, v, u, out, lse (from the torch forward: this file tests the backward) and the
    upstream gradients go, glse, rounded to the dtypes the backward gets, so the float64
    reference sees the same values. go is strided when the problem is."""
    q, k, v, u0 = prob.make()
    u = u0 if u is None else u.to(u0.dtype).to(u0.device)
    out, lse = cpu.forward(q, k, v, u, prob.topk, prob.window, prob.scale)
    g = torch.Generator().manual_seed(prob.seed + 11)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(prob.dtype)
    if not prob.contiguous:
        go = torch.stack([go, torch.zeros_like(go)], -1)[..., 0]
    gl = torch.randn(lse.shape, generator=g, dtype=torch.float64).float() if glse else None
    return q, k, v, u, out, lse, go.to(q.device), None if gl is None else gl.to(q.device)


def check_direct(prob: Problem, glse: bool = True, u=None, to_torch: bool = True, n_segments=None, block_m=None):
    """Calls the Triton backward: within the tolerance model of the float64 reference and close
    to cpu.backward. ``n_segments``: the slot sweep's query segments (None: its own choice);
    ``block_m``: the backward's requested tile rows (None: its own)."""
    q, k, v, u, out, lse, go, gl = backward_inputs(prob, glse, u)
    args = (go, gl, q, k, v, u, out, lse, prob.topk, prob.window, prob.scale)
    gl_ref = torch.zeros(lse.shape, dtype=torch.float64) if gl is None else gl.cpu().double()
    grads = (go.cpu().double(), gl_ref)
    _, _, g64 = reference_run(prob, q, k, v, u, torch.float64, grads)
    _, _, glow = reference_run(prob, q, k, v, u, prob.dtype, grads)
    ref = cpu.backward(*args) if to_torch else None
    mine = triton_backward(*args, n_segments=n_segments, block_m=block_m)
    for i, (name, a, x) in enumerate(zip("qkvu", mine, (q, k, v, u))):
        assert a.shape == x.shape and a.dtype == x.dtype and a.is_contiguous(), name
        assert_within_model(f"d{name}", a.cpu(), g64[i], glow[i], prob.dtype)
        if ref is not None:
            close_to_torch(f"d{name}", a, ref[i], prob.dtype)


# ------------------------------------------------------------------ interpreter
@interpreter
@settings(max_examples=10)
@given(prob=problems(dtypes=(torch.float32, torch.float16), max_s=70), glse=st.booleans(),
       n_segments=st.sampled_from([None, 1, 2, 5]))
def test_interpreter_property_suite(prob, glse, n_segments):
    check_direct(prob, glse, n_segments=n_segments)


@interpreter
@pytest.mark.parametrize("S,topk,window,G,D,Dv,dtype,contiguous", [
    (130, 20, 10, 3, 40, 24, torch.float32, True),  # G = 3: padding rows in every tile
    (97, 6, 17, 2, 16, 64, torch.float16, False),
    (64, 0, 9, 1, 24, 8, torch.float32, True),  # topk = 0: window only
    (90, 95, 0, 4, 8, 16, torch.float32, False),  # window = 0, topk > S: causal attention
    (120, 30, 0, 8, 64, 24, torch.float16, True),  # window = 0 (gaps in the key sweep), G = 8
])
def test_interpreter_fixed_shapes(S, topk, window, G, D, Dv, dtype, contiguous):
    check_direct(Problem(1, 2 * G, 2, S, D, Dv, topk, window, dtype, contiguous=contiguous, seed=S), n_segments=3)


@interpreter
@pytest.mark.parametrize("G,dtype", [(1, torch.float32), (2, torch.float16), (3, torch.float32)])
def test_interpreter_window_blocks_without_mask(G, dtype):
    """Windows much longer than a block (16-row tiles, window 100): the window-key sweep and the
    query kernel's window part run the blocks that see every key without the window mask and
    the edges with it (G = 3: padding rows, masked everywhere); the slot sweep runs its blocks
    in many stretches between slot changes."""
    check_direct(Problem(1, 2 * G, 2, 300, 16, 16, 20, 100, dtype, seed=7), block_m=16, n_segments=2)


@interpreter
def test_interpreter_grad_lse_none_and_large_scores():
    check_direct(Problem(2, 2, 1, 75, 16, 16, 9, 5, torch.float32, scores="large", seed=2), glse=False)


@interpreter
@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("slope", [-0.05, 0.05])
def test_interpreter_long_and_short_lived_pairs(window, slope):
    """Falling scores: the first pairs stay selected for every later query (one slot sweep runs
    over the whole sequence). Rising scores: every newcomer evicts the oldest pair, so every
    slot changes hands every topk queries and many pairs enter and leave within one block."""
    S = 128
    noise = 0.01 * torch.randn(S, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = slope * torch.arange(S, dtype=torch.float64) + noise
    for n_segments in (1, 4):
        check_direct(Problem(1, 2, 1, S, 16, 16, 8, window, torch.float32, seed=4), u=u.expand(1, 1, S).clone(),
                     n_segments=n_segments)


@interpreter
def test_interpreter_autograd_through_the_backend(monkeypatch):
    """The op's autograd reaches this backward (and its slot sweep)."""
    from sparsek_ops.kernels import backward

    calls = count_calls(monkeypatch, backward, "add_selected_grads")
    check_against_reference(Problem(2, 6, 2, 90, 40, 24, 7, 12, torch.float32, seed=5), "triton")
    assert calls == [1]


@interpreter
def test_interpreter_empty_sequence_and_float64_fallback():
    q, k, v, u = Problem(1, 4, 2, 0, 8, 5, 2, 3, torch.float32).make()
    out, lse = cpu.forward(q, k, v, u, 2, 3, 0.3)
    for a, x in zip(triton_backward(out, None, q, k, v, u, out, lse, 2, 3, 0.3), (q, k, v, u)):
        assert a.shape == x.shape and a.dtype == x.dtype
    prob = Problem(1, 2, 1, 20, 8, 8, 3, 2, torch.float64, seed=1)
    q, k, v, u, out, lse, go, gl = backward_inputs(prob)
    args = (go, gl, q, k, v, u, out, lse, 3, 2, prob.scale)
    for a, b in zip(triton_backward(*args), cpu.backward(*args)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_nan_poisons_the_gradients_of_the_queries_that_see_it():
    """dq and du have the NaN pattern of cpu.backward (dq NaN on the poisoned queries' rows, du
    finite). dk and dv are NaN on exactly the keys a poisoned query attends (its selected pairs
    and its window): a subset of cpu.backward's NaN keys, which are the whole gather list and
    span of every block that holds a poisoned query. Everything finite agrees."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    topk, window, S, bad = 5, 4, 90, 37
    prob = Problem(1, 4, 2, S, 16, 16, topk, window, torch.float32, seed=3, device=device)
    u = prob.make()[3].detach().clone()
    u[0, 0, bad] = float("nan")
    q, k, v, u, out, lse, go, gl = backward_inputs(prob, u=u)
    args = (go, gl, q, k, v, u, out, lse, topk, window, prob.scale)
    ref = cpu.backward(*args)
    mine = triton_backward(*args)
    for name in (0, 3):  # dq, du
        assert torch.equal(mine[name].isnan(), ref[name].isnan())
    assert mine[0].isnan().any() and not mine[3].isnan().any()
    # Keys attended by a poisoned query of KV head 0 (queries i >= bad + window).
    first = bad + window
    j = torch.arange(S, device=device)
    evict = sparsek_ops.selection.select(u, topk, window).evict[0].clamp_max(S)
    attended = (j > first - window) | ((j + window < S) & (evict > torch.clamp(j + window, min=first)))
    for name in (1, 2):  # dk, dv
        a, b = mine[name], ref[name]
        assert torch.equal(a[0, 0].isnan().all(-1), attended) and torch.equal(a[0, 0].isnan().any(-1), attended)
        assert not a[0, 1].isnan().any()
        assert not (a.isnan() & ~b.isnan()).any()
    for a, b in zip(mine, ref):
        both = ~(a.isnan() | b.isnan())
        torch.testing.assert_close(a[both], b[both], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@given(prob=problems(max_s=200, device="cuda"), glse=st.booleans(), n_segments=st.sampled_from([None, 1, 3]))
def test_cuda_property_suite(prob, glse, n_segments):
    """bfloat16 included; cpu.backward (float32 math) is compared for float32/float16 only."""
    check_direct(prob, glse, to_torch=prob.dtype in TO_TORCH, n_segments=n_segments)


@pytest.mark.gpu
def test_cuda_autograd_through_the_backend():
    check_against_reference(Problem(2, 8, 2, 200, 64, 64, 24, 16, torch.bfloat16, seed=7, device="cuda"), "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("slope", [0.0, 0.01])
def test_cuda_backward_is_bitwise_repeatable(slope):
    """Same inputs, same bits: no atomics anywhere (slope 0.01: slots change hands often)."""
    prob = Problem(2, 8, 2, 2048, 64, 64, 64, 64, torch.bfloat16, seed=0, device="cuda")
    u = prob.make()[3].detach() + slope * torch.arange(prob.S, device="cuda")
    q, k, v, u, out, lse, go, gl = backward_inputs(prob, u=u)
    args = (go, gl, q, k, v, u, out, lse, prob.topk, prob.window, prob.scale)
    first = triton_backward(*args)
    second = triton_backward(*args)
    for name, a, b in zip("qkvu", first, second):
        assert torch.equal(a, b), f"d{name} differs between two runs"
        assert torch.isfinite(a).all()
