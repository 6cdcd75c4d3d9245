"""The Triton forward leaves its selection for the backward of the same call
(``kernels/selection_cache.py``): the backward must find it, give the same gradients as when it
selects again, and never take a selection that belongs to other scores or settings."""

import pytest
import torch

import sparsek_ops
from helpers import Problem, count_calls

pytestmark = pytest.mark.skipif("triton" not in sparsek_ops.backends.names(), reason="triton is not installed")
interpreter = pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="the interpreter runs only where there is no GPU; see the gpu tests")


def _cache():
    from sparsek_ops.kernels import selection_cache

    return selection_cache


def _sel(u, topk=3, window=2, block_m=16):
    from sparsek_ops import selection

    return selection.select(u, topk, window, block_m, fractional=False)


def test_a_selection_is_found_only_for_the_same_scores_settings_and_block():
    c = _cache()
    c.clear()
    u = torch.randn(1, 2, 40)
    sel = _sel(u)
    c.remember(u, 3, 2, sel)
    assert c.take(u, 4, 2, 16) is None and c.take(u, 3, 1, 16) is None and c.take(u, 3, 2, 32) is None
    assert c.take(u.clone(), 3, 2, 16) is None  # other memory
    assert c.take(u[:, :, :39], 3, 2, 16) is None  # other shape at the same address
    assert c.take(u, 3, 2, 16) is sel
    assert c.take(u, 3, 2, 16) is None  # taken once
    c.remember(u, 3, 2, sel)
    u.add_(1.0)  # changed in place: the version moves on
    assert c.take(u, 3, 2, 16) is None
    c.clear()


def test_the_cache_is_bounded():
    c = _cache()
    c.clear()
    us = [torch.randn(1, 1, 20) for _ in range(c.MAX_ENTRIES + 5)]
    for u in us:
        c.remember(u, 3, 2, _sel(u))
    assert len(c._CACHE) == c.MAX_ENTRIES
    assert c.take(us[0], 3, 2, 16) is None and c.take(us[-1], 3, 2, 16) is not None
    c.clear()


@interpreter
def test_the_backward_takes_the_forwards_selection_and_gets_the_same_gradients(monkeypatch):
    from sparsek_ops.kernels import backward

    c = _cache()
    c.clear()
    prob = Problem(2, 4, 2, 150, 16, 16, 9, 12, torch.float32, seed=3)  # fp32: same blocks forward and backward
    leaves = [x.requires_grad_() for x in prob.make()]
    go = torch.randn(2, 4, 150, 16, generator=torch.Generator().manual_seed(0))
    selects = count_calls(monkeypatch, backward, "select_for")

    def grads(clear_between: bool):
        out = sparsek_ops.sparsek_attention(*leaves, topk=9, window=12, backend="triton")
        if clear_between:
            c.clear()
        return torch.autograd.grad(out, leaves, go)

    shared = grads(False)
    assert selects == [] and len(c._CACHE) == 0  # found and taken
    fresh = grads(True)
    assert selects == [1]
    for name, a, b in zip("qkvu", shared, fresh):
        assert torch.equal(a, b), f"d{name} differs when the backward selects again"


@interpreter
def test_nothing_is_kept_when_no_input_needs_a_gradient():
    c = _cache()
    c.clear()
    q, k, v, u = Problem(1, 2, 1, 40, 8, 8, 3, 4, torch.float32).make()
    sparsek_ops.sparsek_attention(q, k, v, u, topk=3, window=4, backend="triton")
    assert len(c._CACHE) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,Hkv", [(torch.bfloat16, 16), (torch.bfloat16, 2), (torch.float32, 4)])
def test_cuda_backward_takes_the_forwards_selection_with_the_same_gradients(dtype, Hkv):
    c = _cache()
    c.clear()
    g = torch.Generator(device="cuda").manual_seed(0)
    S, Hq, D = 2048, 16, 128
    leaves = [torch.randn(*shape, device="cuda", generator=g, dtype=dt).requires_grad_()
              for shape, dt in (((1, Hq, S, D), dtype), ((1, Hkv, S, D), dtype), ((1, Hkv, S, D), dtype),
                                ((1, Hkv, S), torch.float32))]
    go = torch.randn(1, Hq, S, D, device="cuda", generator=g, dtype=dtype)

    def grads(clear_between: bool):
        out = sparsek_ops.sparsek_attention(*leaves, topk=256, window=256, backend="triton")
        hit = len(c._CACHE) == 1
        if clear_between:
            c.clear()
        return hit, torch.autograd.grad(out, leaves, go)

    hit, shared = grads(False)
    assert hit and len(c._CACHE) == 0
    _, fresh = grads(True)
    for name, a, b in zip("qkvu", shared, fresh):
        assert torch.equal(a, b), f"d{name} differs when the backward selects again"


@interpreter
def test_the_backward_takes_the_forwards_selection_under_torch_compile(monkeypatch):
    """Compiled (Inductor, fullgraph), the op's forward and backward still meet in the cache:
    the backward does not select again, and the gradients equal eager's."""
    from sparsek_ops.kernels import backward

    c = _cache()
    selects = count_calls(monkeypatch, backward, "select_for")
    leaves = [x.requires_grad_() for x in Problem(1, 2, 1, 96, 16, 16, 8, 8, torch.float32, seed=4).make()]

    def loss(q, k, v, u):
        return sparsek_ops.sparsek_attention(q, k, v, u, topk=8, window=8, backend="triton").square().sum()

    grads = {}
    for name, fn in (("eager", loss), ("compiled", torch.compile(loss, fullgraph=True))):
        c.clear()
        grads[name] = torch.autograd.grad(fn(*leaves), leaves)
        assert len(c._CACHE) == 0, name
    assert selects == []
    for a, b in zip(grads["eager"], grads["compiled"]):
        torch.testing.assert_close(a, b)
