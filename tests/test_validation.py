"""Bad input gets a clear error naming the argument and the shapes seen, before any kernel runs."""

import pytest
import torch

import sparsek_ops


def good():
    return dict(q=torch.randn(2, 4, 16, 8), k=torch.randn(2, 2, 16, 8), v=torch.randn(2, 2, 16, 6),
                scores=torch.randn(2, 2, 16))


def call(topk=3, window=2, **over):
    args = {**good(), **over}
    extra = {key: args.pop(key) for key in ("scale", "backend") if key in args}
    return sparsek_ops.sparsek_attention(args["q"], args["k"], args["v"], args["scores"], topk=topk,
                                         window=window, **extra)


CASES = [
    # (overrides, exception, fragments the message must contain)
    (dict(q=torch.randn(2, 4, 16)), ValueError, ["q", "4-d", "(2, 4, 16)"]),
    (dict(k=torch.randn(2, 2, 16, 8, 1)), ValueError, ["k", "(2, 2, 16, 8, 1)"]),
    (dict(scores=torch.randn(2, 2, 16, 1)), ValueError, ["scores", "3-d", "(2, 2, 16, 1)"]),
    (dict(q=[[1.0]]), TypeError, ["q", "torch.Tensor", "list"]),
    (dict(k=torch.randn(2, 2, 15, 8)), ValueError, ["sequence lengths", "(2, 2, 15, 8)", "(2, 4, 16, 8)"]),
    (dict(v=torch.randn(1, 2, 16, 6)), ValueError, ["batch", "(1, 2, 16, 6)"]),
    (dict(k=torch.randn(2, 3, 16, 8), v=torch.randn(2, 3, 16, 6), scores=torch.randn(2, 3, 16)),
     ValueError, ["multiple", "4", "3"]),
    (dict(v=torch.randn(2, 1, 16, 6)), ValueError, ["kv heads", "(2, 1, 16, 6)"]),
    (dict(scores=torch.randn(2, 1, 16)), ValueError, ["kv heads", "(2, 1, 16)"]),
    (dict(k=torch.randn(2, 2, 16, 4)), ValueError, ["head dim", "(2, 2, 16, 4)"]),
    (dict(q=torch.randn(2, 4, 16, 8, dtype=torch.float64)), TypeError, ["dtype", "float64", "float32"]),
    (dict(q=torch.ones(2, 4, 16, 8, dtype=torch.int32)), TypeError, ["q", "int32"]),
    (dict(scores=torch.ones(2, 2, 16, dtype=torch.int64)), TypeError, ["scores", "int64"]),
    (dict(topk=-1), ValueError, ["topk", "-1"]),
    (dict(window=-2), ValueError, ["window", "-2"]),
    (dict(topk=0, window=0), ValueError, ["topk", "window", "0"]),
    (dict(topk=2.5), TypeError, ["topk", "float"]),
    (dict(window=True), TypeError, ["window", "bool"]),
    (dict(scale="big"), TypeError, ["scale", "'big'"]),
    (dict(scale=float("nan")), TypeError, ["scale", "nan"]),
    (dict(backend="cuda-magic"), ValueError, ["backend", "cuda-magic", "torch"]),
]


@pytest.mark.parametrize("over,exc,fragments", CASES)
def test_bad_input_raises_clear_error(over, exc, fragments):
    with pytest.raises(exc) as info:
        call(**over)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_device_mismatch_is_reported():
    meta = torch.empty(2, 2, 16, 6, device="meta")
    with pytest.raises(ValueError, match="one device.*meta"):
        call(v=meta)


def test_no_kernel_runs_on_bad_input(monkeypatch):
    """Validation happens before the op is called."""
    called = []
    monkeypatch.setattr(torch.ops.sparsek, "attention", lambda *a: called.append(a))
    with pytest.raises(ValueError):
        call(topk=0, window=0)
    assert not called


def test_good_input_and_any_float_scores():
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        out = call(scores=torch.randn(2, 2, 16, dtype=dt))
        assert out.shape == (2, 4, 16, 6) and torch.isfinite(out).all()


@pytest.mark.parametrize("over,exc,fragment", [
    (dict(z=[1.0, 2.0]), TypeError, "torch.Tensor"),
    (dict(z=torch.ones(3, dtype=torch.long)), TypeError, "int64"),
    (dict(k=-1), ValueError, "k must be >= 0"),
    (dict(k=1.5), TypeError, "k must be an int"),
    (dict(dim=2), ValueError, "dim 2 is out of range for z of shape (3, 4)"),
    (dict(z=torch.tensor(1.0)), ValueError, "0-d"),
])
def test_mask_bad_input(over, exc, fragment):
    args = dict(z=torch.randn(3, 4), k=2, dim=-1)
    args.update(over)
    with pytest.raises(exc) as info:
        sparsek_ops.sparsek_mask(args["z"], args["k"], dim=args["dim"])
    assert fragment in str(info.value)


def test_auto_backend_is_triton_on_cuda_and_torch_on_cpu():
    from sparsek_ops import backends

    assert backends.resolve("auto", torch.device("cpu")).name == "torch"
    if "triton" in backends.names():
        assert backends.resolve("auto", torch.device("cuda")).name == "triton"
