"""``torch.library`` registrations: the ops, their fake (meta) kernels and their autograd.

    sparsek::topk_mask(Tensor z, int k, int dim=-1) -> Tensor
    sparsek::attention(Tensor q, Tensor k, Tensor v, Tensor u, int topk, int window,
                       float scale, str backend="auto") -> (Tensor out, Tensor lse)
    sparsek::attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k,
                       Tensor v, Tensor u, Tensor out, Tensor lse, int topk, int window,
                       float scale, str backend="auto") -> (Tensor dq, Tensor dk, Tensor dv, Tensor du)
    sparsek::select(Tensor u, int topk, int window, int block_m, bool remember=False) -> (Tensor tau, Tensor evict, Tensor lists)
    sparsek::decode(Tensor q, Tensor k, Tensor v, Tensor u, Tensor(a!) k_win, ..., Tensor(j!) flags,
                    Tensor pos, int topk, int window, float scale, str backend="auto") -> Tensor out

The ops do not validate their inputs (``api.py`` does, before anything runs). The attention
autograd calls ``attention_backward``, a second op, so that both sides can be compiled and,
later, lowered by Inductor.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends, projection
from .cpu import lse_dtype


# ---------------------------------------------------------------------------- topk_mask
@torch.library.custom_op("sparsek::topk_mask", mutates_args=())
def topk_mask(z: Tensor, k: int, dim: int = -1) -> Tensor:
    return projection.topk_mask(z, k, dim)


@topk_mask.register_fake
def _topk_mask_fake(z: Tensor, k: int, dim: int = -1) -> Tensor:
    return z.new_empty(z.shape)


def _topk_mask_setup(ctx, inputs, output):
    ctx.dim = inputs[2] if len(inputs) > 2 else -1
    ctx.save_for_backward(output)


def _topk_mask_backward(ctx, grad):
    (p,) = ctx.saved_tensors
    return projection.topk_mask_backward(p, grad, ctx.dim), None, None


topk_mask.register_autograd(_topk_mask_backward, setup_context=_topk_mask_setup)


# ---------------------------------------------------------------------------- attention
@torch.library.custom_op("sparsek::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, u: Tensor, topk: int, window: int, scale: float,
              backend: str = "auto") -> tuple[Tensor, Tensor]:
    return backends.resolve(backend, q.device).forward(q, k, v, u, topk, window, scale)


def _lowerings(if_inductor_loaded: bool = False) -> None:
    """Registers the Inductor lowerings (``sparsek_lowering``): ``import sparsek_ops`` only if
    Inductor is already loaded (eager users should not pay its import), and the first trace of
    the op (fake kernels run before Inductor lowers anything) in any case."""
    try:
        import sparsek_lowering
    except ImportError:  # the package was installed without its lowering
        return
    if if_inductor_loaded:
        sparsek_lowering.register_if_inductor_loaded()
    else:
        sparsek_lowering.ensure_registered()


@attention.register_fake
def _attention_fake(q, k, v, u, topk, window, scale, backend="auto"):
    _lowerings()
    B, Hq, S, _ = q.shape
    out = q.new_empty(B, Hq, S, v.shape[-1])
    return out, q.new_empty(B, Hq, S, dtype=lse_dtype(q.dtype))


@torch.library.custom_op("sparsek::attention_backward", mutates_args=())
def attention_backward(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                       u: Tensor, out: Tensor, lse: Tensor, topk: int, window: int, scale: float,
                       backend: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backends.resolve(backend, q.device).backward(
        grad_out, grad_lse, q, k, v, u, out, lse, topk, window, scale)


@attention_backward.register_fake
def _attention_backward_fake(grad_out, grad_lse, q, k, v, u, out, lse, topk, window, scale, backend="auto"):
    _lowerings()
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), u.new_empty(u.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, u, topk, window, scale = inputs[:7]
    ctx.args = (topk, window, scale, inputs[7] if len(inputs) > 7 else "auto")
    ctx.save_for_backward(q, k, v, u, *output)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, u, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grads = torch.ops.sparsek.attention_backward(grad_out, grad_lse, q, k, v, u, out, lse, *ctx.args)
    return (*grads, None, None, None, None)


attention.register_autograd(_attention_backward, setup_context=_attention_setup)


# ---------------------------------------------------------------------------- select
@torch.library.custom_op("sparsek::select", mutates_args=())
def select(u: Tensor, topk: int, window: int, block_m: int, remember: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The forward's selection as an op of its own: the Inductor lowering (``sparsek_lowering``)
    runs it as an extern kernel ahead of the attention template, as FlexAttention takes its
    BlockMask from outside. u [B, Hkv, S], any float dtype (the op's own scores: the selection
    is computed in float64). Returns, with R = B * Hkv and NB = ceil(S / block_m):

        tau [R, S] float64, evict [R, S] int32 (not clamped),
        lists [R, NB, topk + block_m] int32, -1 padded ([R, NB, 0] when topk = 0)

    (``selection.Selection`` has the meaning of each; the lists' width does not depend on S,
    so that a compiled graph's shapes stay simple expressions of S.) ``remember``: leave the
    selection for the backward of the same call (``kernels.selection_cache``, keyed by u), as
    the eager forward does when an input requires grad; the lowering sets it in a training
    graph's forward."""
    from .selection import Selection, padded_lists
    from .selection import select as torch_select

    width = topk + block_m if topk > 0 else 0
    if u.is_cuda:
        from .kernels.selection import select as triton_select

        sel = triton_select(u, topk, window, block_m, fractional=False, list_width=width)
        tau, evict, lists = sel.tau.contiguous(), sel.evict.to(torch.int32).contiguous(), sel.block_index.contiguous()
    else:
        sel = torch_select(u, topk, window, block_m, fractional=False)
        lists = padded_lists(sel.block_index, width).contiguous()
        tau, evict = sel.tau.contiguous(), sel.evict.to(torch.int32).contiguous()
    if remember and topk > 0:
        from .kernels import selection_cache

        selection_cache.remember(u, topk, window, Selection(tau, None, evict, lists, topk, window, block_m))
    return tau, evict, lists


@select.register_fake
def _select_fake(u, topk, window, block_m, remember=False):
    B, H, S = u.shape
    NB = (S + block_m - 1) // block_m
    width = topk + block_m if topk > 0 else 0
    return (u.new_empty(B * H, S, dtype=torch.float64), u.new_empty(B * H, S, dtype=torch.int32),
            u.new_empty(B * H, NB, width, dtype=torch.int32))


# ---------------------------------------------------------------------------- decode
_DECODE_STATE = ("k_win", "v_win", "u_win", "k_sel", "v_sel", "u_sel", "pos_sel", "u_tail", "tau", "flags")


@torch.library.custom_op("sparsek::decode", mutates_args=_DECODE_STATE)
def decode(q: Tensor, k: Tensor, v: Tensor, u: Tensor, k_win: Tensor, v_win: Tensor, u_win: Tensor,
           k_sel: Tensor, v_sel: Tensor, u_sel: Tensor, pos_sel: Tensor, u_tail: Tensor, tau: Tensor,
           flags: Tensor, pos: Tensor, topk: int, window: int, scale: float, backend: str = "auto") -> Tensor:
    """One decode step over a ``SparseKCache``'s state (``cache.py`` has the layout), updated in
    place; returns out [B, Hq, 1, Dv]. No autograd: generation only."""
    return decode_impl(backend, q, k, v, u, k_win, v_win, u_win, k_sel, v_sel, u_sel, pos_sel, u_tail, tau,
                       flags, pos, topk, window, scale)


def decode_impl(backend: str, *args):
    """The op's implementation: the backend's decode step on ``args`` (the op's arguments, less
    ``backend``). ``SparseKCache.decode`` calls it directly in eager mode (see there)."""
    impl = backends.resolve(backend, args[0].device).decode
    if impl is None:
        raise ValueError(f"backend {backend!r} has no decode step")
    return impl(*args)


@decode.register_fake
def _decode_fake(q, k, v, u, k_win, v_win, u_win, k_sel, v_sel, u_sel, pos_sel, u_tail, tau, flags, pos,
                 topk, window, scale, backend="auto"):
    return q.new_empty(q.shape[0], q.shape[1], 1, v.shape[-1])
