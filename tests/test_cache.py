"""The SPARSEK KV cache and its decode step (issue 6), on the PyTorch path (backend "torch").

Decoding token by token must give the parallel op's outputs (DESIGN.md section 2, last check),
after any prefill; the cache must hold at most topk + window pairs per KV head however long the
run; its threshold must be the exact tau of all candidates, though it keeps only a few scores.
The Triton decode step is tested against this path in tests/test_decode_triton.py.
"""

import pytest
import torch._dynamo.testing
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import sparsek_ops
from sparsek_ops import projection, reference
from sparsek_ops.cache import SparseKCache
from helpers import Problem

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3}


@st.composite
def decode_problems(draw, dtypes=(torch.float32, torch.float64, torch.float16), max_s=70):
    Hkv = draw(st.integers(1, 2))
    G = draw(st.sampled_from([1, 2, 3, 4]))
    S = draw(st.integers(1, max_s))
    topk, window = draw(st.integers(0, 24)), draw(st.integers(0, 24))
    assume(topk + window > 0)
    prob = Problem(B=draw(st.integers(1, 2)), Hq=Hkv * G, Hkv=Hkv, S=S, D=draw(st.sampled_from([8, 16])),
                   Dv=draw(st.sampled_from([8, 24])), topk=topk, window=window, dtype=draw(st.sampled_from(dtypes)),
                   scores=draw(st.sampled_from(["normal", "ties", "plateau", "large"])),
                   contiguous=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))
    return prob, draw(st.integers(0, S))


def decode_all(prob: Problem, P: int, q, k, v, u, backend="torch", tail_capacity=None, check_state=True):
    """Prefill positions < P, decode the rest one token at a time; -> (out [B, Hq, S - P, Dv], cache)."""
    cache = SparseKCache(prob.B, prob.Hkv, prob.D, prob.Dv, topk=prob.topk, window=prob.window,
                         dtype=prob.dtype, device=q.device, tail_capacity=tail_capacity)
    cache.prefill(k[:, :, :P], v[:, :, :P], u[:, :, :P])
    outs = []
    for i in range(P, prob.S):
        sl = slice(i, i + 1)
        outs.append(cache.decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], u[:, :, sl], backend=backend))
        if check_state:
            check_state_exact(cache, u[:, :, :i + 1], prob.topk, prob.window)
    out = torch.cat(outs, 2) if outs else q.new_empty(prob.B, prob.Hq, 0, prob.Dv)
    return out, cache


def check_state_exact(cache: SparseKCache, u_seen, topk: int, window: int) -> None:
    """The state after positions 0..i: the selected slots are the top-k of the candidates, tau is
    the capped-simplex threshold of all of them, and at most topk + window pairs are held."""
    i = u_seen.shape[-1] - 1
    n = max(0, i + 1 - window)
    held = cache.pairs_held()
    assert (held == min(n, topk) + min(i + 1, window)).all() and (held <= topk + window).all()
    assert cache.length() == i + 1
    if topk == 0 or n == 0:
        return
    cand = u_seen[..., :n].double()
    order = torch.sort(cand, dim=-1, descending=True, stable=True).indices[..., :topk]
    held_pos = torch.sort(torch.where(cache.pos_sel >= 0, cache.pos_sel, 1 << 40), -1).values[..., :min(n, topk)]
    assert torch.equal(held_pos, torch.sort(order, -1).values)
    tau, _ = projection.threshold(cand, topk)
    assert torch.allclose(cache.tau, tau, rtol=1e-12, atol=1e-12, equal_nan=True)


def reference_out(prob, q, k, v, u):
    out, _ = reference.attention(q, k, v, u, prob.topk, prob.window)
    return out


@settings(max_examples=30)
@given(case=decode_problems())
def test_decode_equals_parallel(case):
    """Prefill P tokens (0 included), then decode: every output equals the float64 reference of the
    parallel op, and after every step the state is the exact top-k and tau of all candidates."""
    prob, P = case
    q, k, v, u = prob.make()
    out, cache = decode_all(prob, P, q, k, v, u)
    assert out.dtype == prob.dtype and out.shape == (prob.B, prob.Hq, prob.S - P, prob.Dv)
    ref = reference_out(prob, q, k, v, u)[:, :, P:]
    assert cache.exact()
    size = max(1.0, ref.abs().amax().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out.double(), ref, atol=TOL[prob.dtype] * size, rtol=TOL[prob.dtype])


def test_prefill_then_decode_equals_the_op_over_the_whole_sequence():
    """Generation as a model does it: the op over the prompt, the cache over the rest."""
    prob = Problem(B=2, Hq=4, Hkv=2, S=150, D=16, Dv=8, topk=12, window=9, scores="normal", seed=3)
    q, k, v, u = prob.make()
    whole = sparsek_ops.sparsek_attention(q, k, v, u, topk=12, window=9)
    P = 100
    head = sparsek_ops.sparsek_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P], u[:, :, :P], topk=12, window=9)
    out, _ = decode_all(prob, P, q, k, v, u, check_state=False)
    torch.testing.assert_close(torch.cat([head, out], 2), whole, atol=2e-6, rtol=2e-5)


def test_memory_stays_constant_over_a_long_run():
    """3000 tokens through a cache of topk = 16, window = 8: the bytes never change, at most 24
    pairs are held, and the last output still equals the op's."""
    prob = Problem(B=1, Hq=2, Hkv=1, S=3000, D=8, Dv=8, topk=16, window=8, scores="normal", seed=5)
    q, k, v, u = prob.make()
    u = u + 0.01 * torch.arange(prob.S)  # a recency slope, as the layer's scorer has
    cache = SparseKCache(1, 1, 8, topk=16, window=8)
    size = cache.nbytes()
    for i in range(prob.S):
        sl = slice(i, i + 1)
        out = cache.decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], u[:, :, sl])
        assert cache.nbytes() == size and int(cache.pairs_held().max()) <= 24
    whole = sparsek_ops.sparsek_attention(q, k, v, u, topk=16, window=8)
    torch.testing.assert_close(out, whole[:, :, -1:], atol=2e-6, rtol=2e-5)
    assert cache.exact() and int(cache.pairs_held().max()) == 24


def test_tail_overflow_is_flagged():
    """Scores packed within 1 of tau overfill a small tail: the cache says it is no longer exact
    (with room enough, the same run is exact)."""
    prob = Problem(B=1, Hq=1, Hkv=1, S=200, D=8, Dv=8, topk=8, window=3, scores="ties", seed=2)
    q, k, v, u = prob.make()
    _, small = decode_all(prob, 0, q, k, v, u, tail_capacity=4, check_state=False)
    assert not small.exact()
    out, big = decode_all(prob, 0, q, k, v, u, tail_capacity=256, check_state=False)
    assert big.exact()
    torch.testing.assert_close(out.double(), reference_out(prob, q, k, v, u), atol=1e-5, rtol=1e-5)
    _, pre = decode_all(prob, 150, q, k, v, u, tail_capacity=4, check_state=False)  # overflow in prefill
    assert not pre.exact()


@pytest.mark.parametrize("topk,window,P", [(6, 4, 0), (6, 4, 30), (6, 0, 0)])
def test_non_finite_score_poisons_exactly_the_queries_that_see_it(topk, window, P):
    prob = Problem(B=1, Hq=2, Hkv=1, S=40, D=8, Dv=8, topk=topk, window=window, seed=1)
    q, k, v, u = prob.make()
    j = 20
    u[0, 0, j] = float("nan")
    out, _ = decode_all(prob, P, q, k, v, u, check_state=False)
    first = j + window  # the first query for which position j is a candidate
    rows = torch.arange(P, prob.S)
    assert torch.isnan(out[:, :, rows >= first]).all()
    clean = u.clone()
    clean[0, 0, j] = 0.0
    ref = reference_out(prob, q, k, v, clean)[:, :, P:]
    torch.testing.assert_close(out[:, :, rows < first], ref[:, :, rows < first].float(), atol=2e-6, rtol=2e-5)


def test_bad_input_names_the_argument_and_shapes():
    cache = SparseKCache(2, 2, 8, 4, topk=4, window=4)
    q, k, v, u = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1)
    with pytest.raises(ValueError, match=r"wants k \(2, 2, 1, 8\).*got k \(2, 2, 2, 8\)"):
        cache.decode(q, torch.randn(2, 2, 2, 8), v, u)
    with pytest.raises(ValueError, match=r"q must be \[2, a multiple of 2, 1, 8\].*\(2, 3, 1, 8\)"):
        cache.decode(torch.randn(2, 3, 1, 8), k, v, u)
    with pytest.raises(TypeError, match="k and v must be torch.float32"):
        cache.decode(q, k.half(), v, u)
    with pytest.raises(ValueError, match="u must be a 3-d tensor"):
        cache.prefill(torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="backend must be one of"):
        cache.decode(q, k, v, u, backend="nope")
    with pytest.raises(ValueError, match="topk and window are both 0"):
        SparseKCache(1, 1, 8, topk=0, window=0)
    with pytest.raises(ValueError, match="tail_capacity must be an int >= 0"):
        SparseKCache(1, 1, 8, topk=2, window=0, tail_capacity=-1)
    assert cache.length() == 0  # nothing ran


def test_decode_op_registration():
    """The op's schema, fake kernel and (functionalised) dispatch, as torch.library checks them."""
    prob = Problem(B=1, Hq=2, Hkv=1, S=12, D=8, Dv=8, topk=3, window=2, seed=4)
    q, k, v, u = prob.make()
    cache = SparseKCache(1, 1, 8, topk=3, window=2)
    cache.prefill(k[:, :, :10], v[:, :, :10], u[:, :, :10])
    args = (q[:, :, 10:11], k[:, :, 10:11], v[:, :, 10:11], u[:, :, 10:11], *cache.tensors()[:-1], cache.pos,
            3, 2, 0.3, "torch")
    torch.library.opcheck(torch.ops.sparsek.decode.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_compiled_decode_step_equals_eager_without_recompiles():
    """``torch.compile(fullgraph=True)`` of a cache's decode step: the same outputs as eager, one
    graph for every position (the position is a tensor, not a Python int)."""
    prob = Problem(B=2, Hq=4, Hkv=2, S=30, D=8, Dv=8, topk=5, window=4, seed=6)
    q, k, v, u = prob.make()
    eager, _ = decode_all(prob, 10, q, k, v, u, check_state=False)
    cache = SparseKCache(2, 2, 8, topk=5, window=4)
    cache.prefill(k[:, :, :10], v[:, :, :10], u[:, :, :10])
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(lambda a, b, c, d: cache.decode(a, b, c, d), backend=counter, fullgraph=True)
    outs = [step(*(x[:, :, i:i + 1].contiguous() for x in (q, k, v, u))) for i in range(10, 30)]
    assert counter.frame_count == 1
    torch.testing.assert_close(torch.cat(outs, 2), eager, atol=0, rtol=0)
