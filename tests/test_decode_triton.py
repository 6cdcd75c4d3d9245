"""Backend "triton"'s decode step (sparsek_ops/kernels/decode.py) against the PyTorch one
(``cache.decode_torch``, the statement of the algorithm) and the parallel op.

Every test drives two ``SparseKCache`` through the same tokens, one decoding with backend
"triton" and one with "torch". After every step their states must agree: keys, values,
positions and flags bitwise, scores and tau to float64 rounding (the tau solves differ in
method). The outputs must be the parallel op's in float64 over the whole sequence, within the
tolerance model of DESIGN.md section 5 with the PyTorch decode path in the same dtype as the
low-precision reference.

On CPU these run in Triton's interpreter, in float32 and float16 only (the interpreter computes
bfloat16 dots wrongly, triton issue 11584), and it runs programs one after another, so it can
say nothing about races. ``SPLITS`` are launch configs with small key chunks, so that caches of
a few dozen keys still take several splits (and the merge kernel) and several chunks per split;
``None`` is the kernel's own config (one split at these sizes). The `gpu` tests run on CUDA with
the kernel's own configs, at the sizes it is built for, and under CUDA-graph capture.
"""

import functools

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import sparsek_ops
from sparsek_ops import cache
from sparsek_ops.cache import SparseKCache
from helpers import ATOL, Problem, launch_config, needs_interpreter

pytestmark = [
    pytest.mark.skipif("triton" not in sparsek_ops.backends.names(), reason="triton is not installed"),
    # numpy, in the interpreter: -inf - -inf of empty score entries (NaN, dropped by the kernels)
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

if "triton" in sparsek_ops.backends.names():
    import triton
    import triton.language as tl

    from sparsek_ops.kernels import decode as dec

    # (block_n, keys_per_split): 1 or 2 chunks per split, splits of 16 or 32 keys
    SPLITS = [None, dec.Config(16, 16), dec.Config(16, 32), dec.Config(32, 32)]


# ------------------------------------------------------------------ the harness
def assert_same_state(tri: SparseKCache, tor: SparseKCache, where: str) -> None:
    for name in SparseKCache.TENSORS:
        a, b = getattr(tri, name), getattr(tor, name)
        if a.dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True,
                                       msg=lambda m: f"{where}: {name}: {m}")
        else:
            assert torch.equal(a, b), f"{where}: {name} differs"


def assert_outputs(got: torch.Tensor, lowp: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                   where: str) -> None:
    """NaN exactly where the reference has it; elsewhere |got - ref64| <= 2 |lowp - ref64| + atol
    (atol scaled by the size of the reference values)."""
    assert got.dtype == dtype and got.shape == ref64.shape
    got, lowp, ref64 = (x.detach().cpu().double() for x in (got, lowp, ref64))
    assert torch.equal(got.isnan(), ref64.isnan()), f"{where}: NaN where the reference has none, or the reverse"
    ok = ~ref64.isnan()
    if not ok.any():
        return
    mag = max(1.0, ref64[ok].abs().max().item())
    err = (got - ref64)[ok].abs().max().item()
    ref_err = (lowp - ref64)[ok].abs().max().item()
    bound = 2 * ref_err + ATOL[dtype] * mag
    assert err <= bound, f"{where}: error {err:.3g} > 2 x {ref_err:.3g} + {ATOL[dtype] * mag:.3g}"


def decode_both(q, k, v, u, topk, window, prefix, tail_capacity=None, ref64_cache=False):
    """Prefill a triton cache and a torch cache (same dtype as q) with the first ``prefix`` tokens,
    decode the rest one token at a time, and check after every step that the states agree.
    Returns the outputs [B, Hq, S - prefix, Dv] (triton, torch[, a float64 torch-path cache's])
    and the caches."""
    B, Hq, S, D = q.shape
    H, Dv = k.shape[1], v.shape[-1]
    dtypes = [q.dtype, q.dtype] + ([torch.float64] if ref64_cache else [])
    caches = [SparseKCache(B, H, D, Dv, topk=topk, window=window, dtype=dt, device=q.device,
                           tail_capacity=tail_capacity) for dt in dtypes]
    for c in caches:
        c.prefill(*(x[:, :, :prefix].to(c.dtype) for x in (k, v)), u[:, :, :prefix])
    outs = [[] for _ in caches]
    for t in range(prefix, S):
        tok = [x[:, :, t:t + 1] for x in (q, k, v, u)]
        for c, o, backend in zip(caches, outs, ["triton", "torch", "torch"]):
            o.append(c.decode(*(x.to(c.dtype) for x in tok[:3]), tok[3], backend=backend))
        assert_same_state(caches[0], caches[1], f"after position {t}")
    assert int(caches[0].pos) == S
    return [torch.cat(o, 2) if o else q.new_empty(B, Hq, 0, Dv) for o in outs], caches


def parallel64(q, k, v, u, topk, window):
    """The parallel op in float64 over the whole sequence (backend torch)."""
    return sparsek_ops.sparsek_attention(q.double(), k.double(), v.double(), u.double(), topk=topk, window=window,
                                         backend="torch")


def check_decode(prob: Problem, prefix: int, tail_capacity=None, cfg=None):
    q, k, v, u = prob.make()
    with launch_config(dec, cfg):
        (got, lowp), _ = decode_both(q, k, v, u, prob.topk, prob.window, prefix, tail_capacity)
    ref64 = parallel64(q, k, v, u, prob.topk, prob.window)[:, :, prefix:]
    assert_outputs(got, lowp, ref64, prob.dtype, f"{prob}, prefix {prefix}")


# ------------------------------------------------------------------ interpreter
@st.composite
def decode_problems(draw, dtypes=(torch.float32, torch.float16), max_s=60, max_steps=30):
    Hkv = draw(st.integers(1, 2))
    G = draw(st.sampled_from([1, 2, 3, 4, 8]))
    S = draw(st.integers(1, max_s))
    topk = draw(st.integers(0, 32))
    window = draw(st.integers(0, 32))
    assume(topk + window > 0)
    prob = Problem(
        B=draw(st.integers(1, 2)), Hq=Hkv * G, Hkv=Hkv, S=S,
        D=draw(st.sampled_from([8, 16, 24, 64])), Dv=draw(st.sampled_from([8, 16, 24, 64])),
        topk=topk, window=window, dtype=draw(st.sampled_from(dtypes)),
        scores=draw(st.sampled_from(["normal", "ties", "plateau", "large"])), contiguous=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )
    prefix = draw(st.integers(max(0, S - max_steps), S - 1))
    return prob, prefix, draw(st.sampled_from([None, None, 0, 1, 3]))


@needs_interpreter
@settings(max_examples=12)
@given(case=decode_problems(), cfg=st.sampled_from([0, 1, 2, 3]))
def test_interpreter_matches_torch_decode_and_parallel_op(case, cfg):
    prob, prefix, tail_capacity = case
    check_decode(prob, prefix, tail_capacity, SPLITS[cfg])


# (B, G, Hkv, S, D, Dv, topk, window, prefix, tail capacity, scores, dtype, splits index): each
# line aims at one feature; together: group sizes 1, 2, 3, 4, 8, D != Dv, prefix 0, topk = 0,
# window = 0 and 1, every score kind, both dtypes, one and several splits.
CASES = {
    "prefix0": (1, 2, 1, 30, 16, 16, 6, 5, 0, None, "normal", torch.float32, 1),
    "G1_window0": (2, 1, 2, 32, 16, 24, 7, 0, 8, None, "normal", torch.float32, 2),
    "G3_topk0": (1, 3, 2, 36, 24, 16, 0, 9, 12, None, "normal", torch.float16, 1),
    "G4_D_ne_Dv": (1, 4, 1, 40, 64, 8, 10, 12, 18, None, "normal", torch.float16, 3),
    "G8": (1, 8, 1, 30, 8, 64, 5, 6, 8, None, "normal", torch.float32, 0),
    "window1": (1, 2, 1, 28, 16, 16, 4, 1, 6, None, "ties", torch.float32, 1),
    "ties": (1, 2, 2, 50, 16, 16, 12, 8, 28, None, "ties", torch.float32, 2),
    "plateau": (1, 2, 1, 50, 16, 16, 10, 6, 26, None, "plateau", torch.float16, 1),
    "large": (1, 2, 1, 50, 16, 16, 10, 6, 26, None, "large", torch.float32, 3),
    "topk_ge_S": (1, 2, 1, 30, 16, 16, 40, 3, 4, None, "normal", torch.float32, 1),
}


@needs_interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_interpreter_cases(case):
    B, G, Hkv, S, D, Dv, topk, window, prefix, tail, scores, dtype, cfg = CASES[case]
    prob = Problem(B, G * Hkv, Hkv, S, D, Dv, topk, window, dtype, scores=scores, seed=len(case) + S)
    check_decode(prob, prefix, tail, SPLITS[cfg])


@needs_interpreter
@pytest.mark.parametrize("tail_capacity", [0, 1, 2])
def test_interpreter_tail_overflow_sets_the_flag_as_torch(tail_capacity):
    """Tied scores keep many candidates within 1 of tau: a tail of 0-2 entries overflows, the
    flags (and tau, now inexact) agree with the torch path after every step."""
    prob = Problem(1, 4, 2, 40, 16, 16, 6, 3, torch.float32, scores="ties", seed=tail_capacity)
    q, k, v, u = prob.make()
    with launch_config(dec, SPLITS[1]):
        (got, lowp), (tri, _) = decode_both(q, k, v, u, prob.topk, prob.window, 10, tail_capacity)
    torch.testing.assert_close(got, lowp, rtol=0, atol=1e-5)
    assert not tri.exact()


NAN_PREFIX = 12


@functools.lru_cache(maxsize=None)
def _clean_run(window: int):
    prob = Problem(1, 4, 2, 36, 16, 16, 5, window, torch.float32, seed=9)
    q, k, v, u = prob.make()
    with launch_config(dec, SPLITS[2]):
        (out, _), _ = decode_both(q, k, v, u, 5, window, NAN_PREFIX)
    return (q, k, v, u), out


@needs_interpreter
@pytest.mark.parametrize("bad,window,at", [
    (float("nan"), 0, 5),  # a candidate in the prompt: poisoned by the prefill
    (float("nan"), 4, 20),  # decoded, a candidate 4 steps later
    (float("inf"), 4, 20),
    (float("-inf"), 0, 15),  # decoded, a candidate at once
    (float("nan"), 30, 5),  # in the prompt, still in the window when it ends
])
def test_interpreter_non_finite_score_poisons_from_the_step_it_becomes_a_candidate(bad, window, at):
    """Score ``bad`` at position ``at`` of (batch 0, KV head 0): the outputs of that head's G query
    heads are NaN from position ``at + window`` on (when it becomes a candidate), every other
    output, the earlier ones of that head included, is bitwise that of the clean run, and the
    torch path's states agree all along."""
    (q, k, v, u), clean = _clean_run(window)
    u_bad = u.clone()
    u_bad[0, 0, at] = bad
    with launch_config(dec, SPLITS[2]):
        (got, _), _ = decode_both(q, k, v, u_bad, 5, window, NAN_PREFIX)
    poisoned = torch.zeros_like(got, dtype=torch.bool)
    poisoned[0, :2, max(0, at + window - NAN_PREFIX):] = True
    assert poisoned.any() and not poisoned.all()
    assert torch.equal(got.isnan(), poisoned)
    assert torch.equal(got[~poisoned], clean[~poisoned])


@needs_interpreter
def test_interpreter_strided_inputs_give_the_same_bits():
    """q, k, v in [B, S, H, D] memory order with every other element of D (a view of a wider
    tensor), u a strided slice: the same outputs and states as contiguous inputs, bit for bit."""
    prob = Problem(1, 6, 2, 26, 24, 16, 5, 4, torch.float32, seed=3)
    q, k, v, u = prob.make()

    def strided(x):
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype).transpose(1, 2).contiguous().transpose(1, 2)
        wide[..., ::2] = x
        return wide[..., ::2]

    q2, k2, v2 = (strided(x) for x in (q, k, v))
    u2 = torch.stack([u, u], -1)[..., 1]
    assert not any(x.is_contiguous() for x in (q2, k2, v2, u2))
    with launch_config(dec, SPLITS[1]):
        (a, _), (tri_a, _) = decode_both(q, k, v, u, 5, 4, 8)
        (b, _), (tri_b, _) = decode_both(q2, k2, v2, u2, 5, 4, 8)
    assert torch.equal(a, b)
    assert_same_state(tri_a, tri_b, "strided")


@needs_interpreter
@pytest.mark.parametrize("u_dtype", [torch.bfloat16, torch.float64])
def test_interpreter_score_dtypes(u_dtype):
    prob = Problem(1, 2, 1, 30, 16, 16, 4, 3, torch.float32, seed=4)
    q, k, v, u = prob.make()
    u = u.to(u_dtype)
    (got, lowp), _ = decode_both(q, k, v, u, 4, 3, 6)
    assert_outputs(got, lowp, parallel64(q, k, v, u, 4, 3)[:, :, 6:], torch.float32, str(u_dtype))


def test_float64_takes_the_torch_path():
    """The kernels keep float32 softmax state: float64 goes to cache.decode_torch, same bits."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prob = Problem(1, 2, 1, 20, 16, 16, 3, 2, torch.float64, seed=1, device=device)
    (got, lowp), _ = decode_both(*prob.make(), 3, 2, 5)
    assert torch.equal(got, lowp)


# ------------------------------------------------------------------ the tau solve on its own
if "triton" in sparsek_ops.backends.names():

    @triton.jit
    def _threshold_kernel(Z, OLD, TAU, STEPS, n, k, BZ: tl.constexpr, MAX_STEPS: tl.constexpr):
        r = tl.program_id(0)
        idx = tl.arange(0, BZ)
        z = tl.load(Z + r * n + idx, mask=idx < n, other=float("-inf"))
        live = z > float("-inf")
        zmin = tl.min(tl.where(live, z, float("inf")), 0)
        zmax = tl.max(z, 0)
        tau, steps = dec._threshold(z, k, tl.load(OLD + r), zmin, zmax, MAX_STEPS)
        tl.store(TAU + r, tau)
        tl.store(STEPS + r, steps)


def _scores(kind: str, R: int, n: int, g: torch.Generator) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(R, n, generator=g, dtype=torch.float64) * 2
    if kind == "ties":
        return (torch.rand(4, generator=g, dtype=torch.float64) * 0.9)[torch.randint(0, 4, (R, n), generator=g)]
    if kind == "plateau":
        return torch.randint(-3, 4, (R, n), generator=g).double()
    if kind == "large":
        return torch.randn(R, n, generator=g, dtype=torch.float64) * 1e4
    # clusters of nearly equal scores, 1 apart: many breakpoints within 1e-6 of each other
    jitter = torch.randn(R, n, generator=g, dtype=torch.float64) * 1e-6
    return torch.randint(0, 3, (R, n), generator=g).double() + jitter


def assert_same_root(tau: torch.Tensor, ref: torch.Tensor, z: torch.Tensor, k: int) -> None:
    """tau equals ref to float64 rounding, or both are roots and tau is the larger one, f = k on
    [ref, tau] (a plateau): there ``projection.threshold``'s f, from prefix sums, is off by more
    than F_SLACK (scores of 1e4, thousands of them) and misses the largest root; the weights
    clip(z - tau, 0, 1) are the same for every root."""
    zf = torch.where(torch.isfinite(z), z, float("-inf"))

    def f(t):
        return (zf - t[:, None]).clamp(0, 1).sum(-1)

    same = torch.isclose(tau, ref, rtol=1e-12, atol=1e-12)
    plateau = (tau > ref) & ((f(tau) - k).abs() < 1e-6) & ((f(ref) - k).abs() < 1e-6) & \
        ((f((tau + ref) / 2) - k).abs() < 1e-6)
    assert (same | plateau).all(), (tau[~same].tolist(), ref[~same].tolist())


@needs_interpreter
@pytest.mark.parametrize("kind", ["normal", "ties", "plateau", "large", "clustered"])
@pytest.mark.parametrize("n,k", [(5, 2), (40, 7), (3073, 1024)])
@pytest.mark.parametrize("start", ["-inf", "below", "above"])
def test_threshold_matches_projection(kind, n, k, start):
    """``_threshold`` against ``cache.retained_threshold`` (projection.threshold), with every
    seventh entry empty (-inf) and the old tau -inf (no start), a valid start below the root, or
    above it (the tail overflowed: tau may go down); the bracketing never reaches its cap."""
    R = 6
    g = torch.Generator().manual_seed(n + k)
    z = _scores(kind, R, n, g)
    if n > 3 * k:
        z[:, ::7] = float("-inf")
    ref = cache.retained_threshold(z, k)
    old = {"-inf": torch.full((R,), float("-inf"), dtype=torch.float64),
           "below": ref - torch.rand(R, generator=g, dtype=torch.float64) * 0.3,
           "above": ref + torch.rand(R, generator=g, dtype=torch.float64) * 0.3}[start]
    tau = torch.empty(R, dtype=torch.float64)
    steps = torch.empty(R, dtype=torch.int32)
    _threshold_kernel[(R,)](z, old, tau, steps, n, k, triton.next_power_of_2(n), dec.MAX_SOLVE_STEPS)
    assert_same_root(tau, ref, z, k)
    assert (steps < dec.MAX_SOLVE_STEPS).all()


@needs_interpreter
@pytest.mark.parametrize("kind", ["normal", "ties", "plateau", "large"])
def test_threshold_from_the_last_tau_takes_few_steps(kind):
    """The decode case: the scores of the step before plus one candidate, started from the tau
    of the step before (Newton from there lands on the root unless a breakpoint is in between)."""
    R, n, k = 16, 700, 256
    g = torch.Generator().manual_seed(5)
    z = _scores(kind, R, n, g)
    old = cache.retained_threshold(z[:, :-1], k)
    ref = cache.retained_threshold(z, k)
    tau = torch.empty(R, dtype=torch.float64)
    steps = torch.empty(R, dtype=torch.int32)
    _threshold_kernel[(R,)](z, old, tau, steps, n, k, triton.next_power_of_2(n), dec.MAX_SOLVE_STEPS)
    assert_same_root(tau, ref, z, k)
    assert steps.max() <= 8 and steps.float().mean() <= 2.5, steps.tolist()


# ------------------------------------------------------------------ GPU
# (B, G, Hkv, D, Dv, topk, window, prefix, steps, tail capacity, scores)
GPU_SHAPES = {
    "gqa4_d128": (2, 4, 2, 128, 128, 64, 32, 300, 40, None, "normal"),
    "topk0_g8": (1, 8, 1, 64, 32, 0, 100, 150, 20, None, "normal"),
    "window0_d256_overflow": (1, 1, 2, 256, 64, 50, 0, 200, 20, 8, "ties"),
    "g3_large": (2, 3, 1, 64, 64, 40, 24, 120, 30, None, "large"),
    "topk_window_1024": (1, 4, 4, 128, 128, 1024, 1024, 8192, 24, None, "normal"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_cuda_matches_torch_decode(dtype, shape):
    """On CUDA with the kernel's own configs: the states equal the torch path's after every
    step; the outputs are the float64 torch path's within the tolerance model (the torch path in
    the same dtype as the low-precision reference)."""
    B, G, Hkv, D, Dv, topk, window, prefix, steps, tail, scores = GPU_SHAPES[shape]
    prob = Problem(B, G * Hkv, Hkv, prefix + steps, D, Dv, topk, window, dtype, scores=scores, seed=7,
                   device="cuda")
    q, k, v, u = prob.make()
    (got, lowp, ref64), _ = decode_both(q, k, v, u, topk, window, prefix, tail, ref64_cache=True)
    assert_outputs(got, lowp, ref64, dtype, shape)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_graph_replay_matches_eager(dtype):
    """One ``SparseKCache.decode`` step (the pos increment included) captured in a CUDA graph
    after a warm-up on a copy, replayed token after token: the same outputs and states as eager
    decoding, bit for bit."""
    B, G, H, D, topk, window, prefix, steps = 2, 4, 2, 128, 256, 128, 1000, 12
    prob = Problem(B, G * H, H, prefix + steps, D, D, topk, window, dtype, seed=2, device="cuda")
    q, k, v, u = prob.make()
    graphed, eager, warm = (SparseKCache(B, H, D, topk=topk, window=window, dtype=dtype, device="cuda")
                            for _ in range(3))
    for c in (graphed, eager, warm):
        c.prefill(k[:, :, :prefix], v[:, :, :prefix], u[:, :, :prefix])
    bufs = [x[:, :, prefix:prefix + 1].clone() for x in (q, k, v, u)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles the kernels, outside the capture
        warm.decode(*bufs, backend="triton")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = graphed.decode(*bufs, backend="triton")
    for t in range(prefix, prefix + steps):
        for buf, x in zip(bufs, (q, k, v, u)):
            buf.copy_(x[:, :, t:t + 1])
        graph.replay()
        want = eager.decode(*(x[:, :, t:t + 1] for x in (q, k, v, u)), backend="triton")
        assert torch.equal(out, want), f"position {t}"
    for name in SparseKCache.TENSORS:
        assert torch.equal(getattr(graphed, name), getattr(eager, name)), name
    assert int(graphed.pos) == prefix + steps
