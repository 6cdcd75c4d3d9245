"""The window part of the CPU forward through ATen's fused CPU attention kernel
(``aten::_scaled_dot_product_flash_attention_for_cpu``).

Within a block of queries the window is plain attention over the block's span of
``window + BM - 1`` keys with a fixed band mask, which is exactly what the fused kernel does
well: about 2x faster than the elementwise tiles of ``cpu.py`` (measured in bench/NOTES.md).
It reads the spans as strided views, without copies. The selected pairs stay in ``cpu.py``:
their weight ``p_ij`` multiplies the logits, which an additive mask cannot express.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def available() -> bool:
    return _FUSED is not None


def _pad_last(x: Tensor, size: int) -> Tensor:
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def window_part(plan, x) -> Callable:
    """A function ``(plan, x, f0, f1) -> (o [nc, G*BM, Dv], lse [nc, G*BM])`` for the window part
    of blocks f0 .. f1-1. The fused kernel wants one head size for q, k and v: ``x`` was built
    with its buffers ``max(D, Dv)`` wide, and q is padded per chunk."""
    E = max(plan.D, plan.Dv)
    kbuf, vbuf = x.kbuf, x.vbuf
    assert kbuf.shape[-1] == E and vbuf.shape[-1] == E
    G, BM = plan.G, plan.BM

    def part(plan, x, f0: int, f1: int) -> tuple[Tensor, Tensor]:
        nc = f1 - f0
        kw = plan.spans(kbuf, f0, f1)[:, None].expand(nc, G, plan.Wn, E)
        vw = plan.spans(vbuf, f0, f1)[:, None].expand(nc, G, plan.Wn, E)
        mask = x.band[None, None, :BM]
        before = plan.keys_before_start(f0, f1)
        if before is not None:
            mask = mask.masked_fill(before[:, None, None, :], float("-inf"))
        qs = _pad_last(x.qs[f0:f1].view(nc, G, BM, plan.D), E)
        o, lse = _FUSED(qs, kw, vw, attn_mask=mask, scale=1.0)
        return o[..., : plan.Dv].reshape(nc, G * BM, plan.Dv), lse.reshape(nc, G * BM)

    return part
