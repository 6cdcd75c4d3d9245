"""One selection per call, shared by the forward and the backward.

The selection (tau, eviction indices, gather lists) depends only on the scores u, topk, window
and the query-block size. The forward computes it; the backward needs the same one, and
computing it again costs about 1.3 ms of an 18 ms step at S = 32K on an H100 (bench/NOTES.md).
The op's outputs are fixed (out, lse), so the forward leaves its selection here and the
backward takes it back.

Why a hit is always the right selection: the key is u's address, version counter, shape,
strides, dtype and device, with topk, window and the block size. The autograd saves u for the
backward, so u's memory stays alive and unchanged (an in-place change bumps the version) from
the forward to the backward; any later forward on a tensor at that address stores its own
entry, replacing an older one. A miss (an entry evicted by the bound, a forward that did not
store, a second backward) only means the backward selects again.

Entries are stored only when an input requires grad (a backward may follow) and never while a
CUDA graph is being captured (the captured backward would keep the capture's tensors).

Memory: an entry holds tau (8 bytes per position and KV head), the eviction indices (4) and the
gather lists (4 * (topk + block) per block of queries and KV head): about 25 MB at S = 32K,
16 KV heads, topk = 1024, against about 540 MB of q, k, v and out that the autograd saves for
the same call in bf16.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from ..selection import Selection

MAX_ENTRIES = 64  # forwards whose backward has not run yet (one per attention layer of a step)
_CACHE: "OrderedDict[tuple, Selection]" = OrderedDict()


def _usable(u: Tensor) -> bool:
    return not (u.is_cuda and torch.cuda.is_current_stream_capturing())


def _key(u: Tensor, topk: int, window: int, block_m: int) -> tuple:
    return (u.device, u.data_ptr(), u._version, tuple(u.shape), u.stride(), u.dtype, topk, window, block_m)


def remember(u: Tensor, topk: int, window: int, sel: Selection) -> None:
    """Keep the forward's selection of scores u for the backward of the same call."""
    if not _usable(u):
        return
    key = _key(u, topk, window, sel.block_m)
    _CACHE[key] = sel
    _CACHE.move_to_end(key)
    while len(_CACHE) > MAX_ENTRIES:
        _CACHE.popitem(last=False)


def take(u: Tensor, topk: int, window: int, block_m: int) -> Selection | None:
    """The selection the forward left for scores u (removed from the cache), or None."""
    if not _usable(u):
        return None
    return _CACHE.pop(_key(u, topk, window, block_m), None)


def clear() -> None:
    _CACHE.clear()
