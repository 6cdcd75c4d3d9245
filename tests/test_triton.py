"""Backend "triton" (Triton forward, PyTorch backward) against the float64 reference.

On CPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), in float32 and
float16 only: the interpreter computes bfloat16 dots wrongly (triton issue 11584), and it runs
programs one after another, so it can say nothing about races. The `gpu` twins run on CUDA.
"""

import pytest
import torch
from hypothesis import given, settings

import sparsek_ops
from helpers import Problem
from test_attention import check_against_reference, problems

pytestmark = pytest.mark.skipif("triton" not in sparsek_ops.backends.names(), reason="triton is not installed")


@settings(max_examples=12)
@given(prob=problems(dtypes=(torch.float32, torch.float16), max_s=70))
def test_interpreter_matches_reference(prob):
    if torch.cuda.is_available():
        pytest.skip("the interpreter runs only where there is no GPU; see the gpu tests")
    check_against_reference(prob, "triton")


@pytest.mark.parametrize("S,topk,window,G", [(97, 6, 17, 2), (64, 0, 9, 1), (80, 90, 0, 3)])
def test_interpreter_fixed_shapes(S, topk, window, G):
    if torch.cuda.is_available():
        pytest.skip("the interpreter runs only where there is no GPU; see the gpu tests")
    check_against_reference(Problem(1, 2 * G, 2, S, 24, 16, topk, window, torch.float32, seed=S), "triton")


def test_nan_poisons_the_same_queries_as_the_torch_backend():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, u = Problem(1, 2, 1, 60, 16, 16, 5, 4, torch.float32, seed=3, device=device).make()
    u[0, 0, 25] = float("nan")
    a = sparsek_ops.sparsek_attention(q, k, v, u, topk=5, window=4, backend="triton")
    b = sparsek_ops.sparsek_attention(q, k, v, u, topk=5, window=4, backend="torch")
    assert torch.equal(a.isnan(), b.isnan()) and a.isnan().any()
    torch.testing.assert_close(a.nan_to_num(), b.nan_to_num())


@pytest.mark.gpu
@given(prob=problems(max_s=200, device="cuda"))
def test_triton_on_cuda_matches_reference(prob):
    check_against_reference(prob, "triton")
