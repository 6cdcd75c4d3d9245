"""Public functions. They validate their inputs (shapes, dtypes, devices, arguments; never
values, so there is no host synchronisation) and then call the ``sparsek::`` ops."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import backends
from . import library  # noqa: F401  (registers the ops)

_QKV_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


class _Shapes:
    """The shapes of q, k, v and scores for an error message, formatted when printed."""

    def __init__(self, q, k, v, scores):
        self.tensors = (("q", q), ("k", k), ("v", v), ("scores", scores))

    def __format__(self, spec) -> str:
        return ", ".join(f"{name} {_shape(t)}" for name, t in self.tensors)


def _require_tensor(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"sparsek_attention: {name} must be a torch.Tensor, got {type(x).__name__}")


def _require_int(fn: str, name: str, x, minimum: int = 0) -> None:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be an int, got {type(x).__name__} ({x!r})")
    if x < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {x}")


def validate_attention(q, k, v, scores, topk, window, scale, backend) -> float:
    """Check everything DESIGN.md section 2 asks of the inputs; return the resolved scale."""
    fn = "sparsek_attention"
    for name, x in (("q", q), ("k", k), ("v", v), ("scores", scores)):
        _require_tensor(name, x)
    for name, x, layout in (("q", q, "[batch, q_heads, seq, dim]"), ("k", k, "[batch, kv_heads, seq, dim]"),
                            ("v", v, "[batch, kv_heads, seq, v_dim]"), ("scores", scores, "[batch, kv_heads, seq]")):
        want = 3 if name == "scores" else 4
        if x.dim() != want:
            raise ValueError(f"{fn}: {name} must be {want}-d {layout}, got shape {_shape(x)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in _QKV_DTYPES:
            raise TypeError(f"{fn}: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{fn}: q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"{fn}: scores must be a floating-point tensor, got {scores.dtype}")
    devices = {x.device for x in (q, k, v, scores)}
    if len(devices) > 1:
        raise ValueError(f"{fn}: q, k, v and scores must be on one device, got q {q.device}, "
                         f"k {k.device}, v {v.device}, scores {scores.device}")
    B, Hq, S, D = q.shape
    # Formatted only for an error: under torch.compile(dynamic=True) the sizes are symbols, which
    # dynamo cannot turn into a string without a graph break.
    shapes = _Shapes(q, k, v, scores)
    if k.shape[0] != B or v.shape[0] != B or scores.shape[0] != B:
        raise ValueError(f"{fn}: batch sizes differ: {shapes}")
    if k.shape[2] != S or v.shape[2] != S or scores.shape[2] != S:
        raise ValueError(f"{fn}: sequence lengths differ: {shapes}")
    Hkv = k.shape[1]
    if v.shape[1] != Hkv or scores.shape[1] != Hkv:
        raise ValueError(f"{fn}: k, v and scores must have the same number of kv heads: {shapes}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{fn}: q heads ({Hq}) must be a multiple of kv heads ({Hkv}): {shapes}")
    if k.shape[3] != D:
        raise ValueError(f"{fn}: q and k must have the same head dim: {shapes}")
    if D == 0 or v.shape[3] == 0:
        raise ValueError(f"{fn}: head dims must be positive: {shapes}")
    _require_int(fn, "topk", topk)
    _require_int(fn, "window", window)
    if topk == 0 and window == 0:
        raise ValueError(f"{fn}: topk and window are both 0, so no query attends to anything")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"{fn}: scale must be a finite real number or None, got {scale!r}")
    backends.check_name(backend)
    return float(scale)


def sparsek_attention(q: Tensor, k: Tensor, v: Tensor, scores: Tensor, *, topk: int, window: int,
                      scale: float | None = None, return_lse: bool = False, backend: str = "auto"):
    """SPARSEK attention (DESIGN.md section 2): every query attends to the ``topk`` highest-scored
    earlier pairs (soft-weighted by the SPARSEK operator) plus a sliding window of ``window``
    recent positions, in one softmax.

    Args:
        q: [B, Hq, S, D] float16, bfloat16, float32 or float64.
        k: [B, Hkv, S, D], same dtype and device; ``Hq % Hkv == 0`` (GQA: query heads
           ``h*G .. h*G+G-1`` use KV head h).
        v: [B, Hkv, S, Dv].
        scores: [B, Hkv, S] any float dtype, the importance of each KV position (computed in
           float64). A non-finite score makes the outputs of the queries that can see it NaN.
        topk, window: ints >= 0, not both 0.
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return ``lse [B, Hq, S]`` (float32; float64 for float64 inputs).
        backend: ``"auto"`` or a name from ``sparsek_ops.backends.names()``.

    Returns:
        out [B, Hq, S, Dv] in the dtype of q, or ``(out, lse)``. Differentiable in q, k, v and scores.
    """
    scale = validate_attention(q, k, v, scores, topk, window, scale, backend)
    out, lse = torch.ops.sparsek.attention(q, k, v, scores, topk, window, scale, backend)
    return (out, lse) if return_lse else out


def sparsek_mask(z: Tensor, k: int, dim: int = -1) -> Tensor:
    """The SPARSEK operator: the Euclidean projection of ``z`` onto ``{0 <= p <= 1, sum p = k}``
    along ``dim``, ``p = clip(z - tau, 0, 1)``. O(n log n), differentiable.

    ``k >= n`` gives all ones (every entry kept), ``k = 0`` all zeros. A slice holding a
    non-finite value gives NaN. Returns a contiguous tensor of z's shape and dtype.
    """
    fn = "sparsek_mask"
    if not isinstance(z, Tensor):
        raise TypeError(f"{fn}: z must be a torch.Tensor, got {type(z).__name__}")
    if not z.dtype.is_floating_point:
        raise TypeError(f"{fn}: z must be a floating-point tensor, got {z.dtype}")
    _require_int(fn, "k", k)
    _require_int(fn, "dim", dim, minimum=-(2 ** 62))
    if z.dim() == 0:
        raise ValueError(f"{fn}: z must have at least one dimension, got a 0-d tensor")
    if not -z.dim() <= dim < z.dim():
        raise ValueError(f"{fn}: dim {dim} is out of range for z of shape {_shape(z)}")
    return torch.ops.sparsek.topk_mask(z, k, dim)
