"""The SPARSEK operator on its own: sparsek_mask / sparsek::topk_mask."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsek_ops
from sparsek_ops import projection, reference


def _vectors(draw_shape, seed, kind):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*draw_shape, generator=g, dtype=torch.float64)
    if kind == "ties":
        z = (z * 2).round() / 2
    elif kind == "large":
        z = z * 1e5
    return z


@given(rows=st.integers(1, 4), n=st.integers(1, 60), k=st.integers(0, 70), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["normal", "ties", "large"]))
def test_mask_matches_reference_and_constraints(rows, n, k, seed, kind):
    z = _vectors((rows, n), seed, kind)
    p = sparsek_ops.sparsek_mask(z, k)
    ref = reference.topk_mask(z, k)
    torch.testing.assert_close(p, ref, atol=1e-9 * max(1.0, z.abs().max().item()), rtol=0)
    assert ((p >= 0) & (p <= 1)).all()
    torch.testing.assert_close(p.sum(-1), torch.full((rows,), float(min(k, n)), dtype=z.dtype), atol=1e-9 * n, rtol=0)


@given(n=st.integers(2, 30), k=st.integers(1, 29), seed=st.integers(0, 2**16))
def test_mask_is_the_euclidean_projection(n, k, seed):
    """No feasible point is closer to z than p (checked against random feasible points)."""
    k = min(k, n - 1)
    z = _vectors((n,), seed, "normal")
    p = sparsek_ops.sparsek_mask(z, k)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(20):
        other = reference.topk_mask(torch.randn(n, generator=g, dtype=torch.float64) * 3, k)
        for t in (0.1, 0.5, 1.0):
            cand = (1 - t) * p + t * other  # feasible: the set is convex
            assert ((cand - z) ** 2).sum() >= ((p - z) ** 2).sum() - 1e-12


def test_mask_dim_dtype_and_layout():
    z = torch.randn(3, 7, 5)
    for dim in (0, 1, 2, -1, -2):
        p = sparsek_ops.sparsek_mask(z, 2, dim=dim)
        assert p.shape == z.shape and p.dtype == z.dtype and p.is_contiguous()
        torch.testing.assert_close(p.sum(dim), torch.full_like(p.sum(dim), 2.0))
        torch.testing.assert_close(p.double(), reference.topk_mask(z.double(), 2, dim), atol=1e-6, rtol=0)
    half = sparsek_ops.sparsek_mask(z.to(torch.bfloat16), 3)
    assert half.dtype == torch.bfloat16


def test_mask_edge_cases():
    z = torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(sparsek_ops.sparsek_mask(z, 0), torch.zeros_like(z))
    assert torch.equal(sparsek_ops.sparsek_mask(z, 6), torch.ones_like(z))
    assert torch.equal(sparsek_ops.sparsek_mask(z, 9), torch.ones_like(z))
    z[1, 2] = float("nan")
    p = sparsek_ops.sparsek_mask(z, 2)
    assert p[1].isnan().all() and not p[[0, 2, 3]].isnan().any()


def test_mask_gradcheck_and_jacobian():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 9, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: sparsek_ops.sparsek_mask(z, 3), (z,))
    assert torch.autograd.gradcheck(lambda z: sparsek_ops.sparsek_mask(z, 2, dim=0), (z,))
    # The Jacobian of DESIGN.md section 3, item 5, restricted to one vector.
    p = projection.topk_mask(z.detach(), 3)
    grad = torch.randn(3, 9, generator=g, dtype=torch.float64)
    (dz,) = torch.autograd.grad(sparsek_ops.sparsek_mask(z, 3), z, grad)
    frac = (p > 0) & (p < 1)
    expected = torch.where(frac, grad - (grad * frac).sum(-1, keepdim=True) / frac.sum(-1, keepdim=True), 0.0)
    torch.testing.assert_close(dz, expected)


@pytest.mark.parametrize("dim", [-1, 0])
def test_mask_opcheck(dim):
    z = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.sparsek.topk_mask.default, (z, 3, dim))


def test_mask_compiles_without_graph_breaks():
    def f(z):
        return sparsek_ops.sparsek_mask(z * 2, 3).square().sum()

    z = torch.randn(5, 11, requires_grad=True)
    explanation = torch._dynamo.explain(f)(z)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (g1,) = torch.autograd.grad(compiled(z), z)
    (g2,) = torch.autograd.grad(f(z), z)
    torch.testing.assert_close(g1, g2)
