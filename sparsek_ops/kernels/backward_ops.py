"""The Triton backward's stages that are not attention tiles, as ops of their own, so that the
Inductor lowering of ``sparsek::attention_backward`` (``sparsek_lowering``) can run them as
extern kernels between its two templates (the window keys' dk, dv and the query kernel's dq):

    sparsek::backward_prep(grad_out, grad_lse?, out, u, topk, window, block_q)
        -> shift, u64, tau, frac, evict, lists, counts          (``backward.prepare``)
    sparsek::backward_selected(dk!, dv!, q, k, v, grad_out, lse, shift, u64, tau, evict, frac,
                               topk, window, scale) -> du       (``slots.add_selected_grads``)
    sparsek::backward_du(du, crow, frac) -> du                   (``backward.finish_du``)

Same functions as the eager ``backward.backward``, so the compiled backward computes the same
numbers in the same order. Shapes (R = B * Hkv, NBQ = ceil(S / block_q)): see each function.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backward as _bwd
from .slots import add_selected_grads


@torch.library.custom_op("sparsek::backward_prep", mutates_args=())
def backward_prep(grad_out: Tensor, grad_lse: Optional[Tensor], out: Tensor, u: Tensor, topk: int, window: int,
                  block_q: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``backward.prepare`` with the gather lists padded to width ``topk + block_q``: shift
    [B, Hq, S] float32, u64 [R, S] float64, tau [R, S] float64, frac [R, S, 2] int32, evict
    [R, S] int32, lists [R, NBQ, topk + block_q] int32, counts [R, NBQ] int32 (topk = 0: tau,
    frac, evict, counts [1], lists [1, 1, 0])."""
    width = topk + block_q if topk > 0 else None
    outs = _bwd.prepare(grad_out, grad_lse, out, u, topk, window, block_q, list_width=width)
    return tuple(x if x._base is None else x.clone() for x in outs)


@backward_prep.register_fake
def _backward_prep_fake(grad_out, grad_lse, out, u, topk, window, block_q):
    B, Hq, S, _ = out.shape
    R = B * u.shape[1]
    new = out.new_empty
    shift = new(B, Hq, S, dtype=torch.float32)
    u64 = new(R, S, dtype=torch.float64)
    if topk == 0:
        one = new(1, dtype=torch.int32)
        return shift, u64, new(1, dtype=torch.float64), one, new(1, dtype=torch.int32), \
            new(1, 1, 0, dtype=torch.int32), new(1, dtype=torch.int32)
    NBQ = (S + block_q - 1) // block_q
    return (shift, u64, new(R, S, dtype=torch.float64), new(R, S, 2, dtype=torch.int32), new(R, S, dtype=torch.int32),
            new(R, NBQ, topk + block_q, dtype=torch.int32), new(R, NBQ, dtype=torch.int32))


@torch.library.custom_op("sparsek::backward_selected", mutates_args=("dk", "dv"))
def backward_selected(dk: Tensor, dv: Tensor, q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, lse: Tensor,
                      shift: Tensor, u64: Tensor, tau: Tensor, evict: Tensor, frac: Tensor, topk: int, window: int,
                      scale: float) -> Tensor:
    """Adds the selected pairs' dk, dv into dk [B, Hkv, S, D], dv [B, Hkv, S, Dv] (float32,
    contiguous, in place) and returns du's first term [R, S] float64. lse [B, Hq, S] float32
    contiguous; the rest as ``prepare`` gives them."""
    B, Hq, S, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    R = B * Hkv
    du = torch.zeros(R, S, dtype=torch.float64, device=q.device)
    pl = _bwd.plan(D, Dv, q.dtype, Hq // Hkv)
    with _bwd._device(q.device):
        add_selected_grads(q, k, v, grad_out, lse, shift, u64, tau, evict.view(R, S), frac, dk.view(R, S, D),
                           dv.view(R, S, Dv), du, topk, window, scale, pl.meta)
    return du


@backward_selected.register_fake
def _backward_selected_fake(dk, dv, q, k, v, grad_out, lse, shift, u64, tau, evict, frac, topk, window, scale):
    return u64.new_empty(u64.shape)


@torch.library.custom_op("sparsek::backward_du", mutates_args=())
def backward_du(du: Tensor, crow: Tensor, frac: Tensor) -> Tensor:
    """``backward.finish_du``: du [R, S] float64 from its first term du [R, S], the query
    kernel's sums crow [R, S, G] float64 and the ranges frac [R, S, 2]."""
    return _bwd.finish_du(du, crow, frac)


@backward_du.register_fake
def _backward_du_fake(du, crow, frac):
    return du.new_empty(du.shape)
