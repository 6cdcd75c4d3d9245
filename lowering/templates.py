"""Inductor template sources (jinja) of the SPARSEK kernels.

One source of truth: a template holds only the glue Inductor needs -- its kernel signature
(``def_kernel``), the strides and sizes of the buffers it was given, and the stores (the output
through ``store_output``, so that Inductor can fuse pointwise epilogues into it). The math is the
eager kernels' own ``@triton.jit`` functions (``sparsek_ops.kernels.forward.fwd_rows``,
``kernels.backward.window_key_cols`` and ``query_rows``), which the generated module imports.
A change to those files changes ``KERNEL_VERSION``, which is
written into every template: Inductor's template code cache and its autotuning cache key on the
template's source, so neither serves a kernel built from older code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import sparsek_ops.kernels as _kernels

# The files whose Triton code the templates call (through the imports below).
_SOURCES = ("common.py", "forward.py", "backward.py")


def kernel_version() -> str:
    """A short hash of the Triton sources the templates call, and of this file."""
    h = hashlib.sha256()
    root = Path(_kernels.__file__).parent
    for name in _SOURCES:
        h.update((root / name).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


KERNEL_VERSION = kernel_version()

_HEADER = f"""
# sparsek kernels {KERNEL_VERSION}
from sparsek_ops.kernels import backward as sparsek_backward
from sparsek_ops.kernels import forward as sparsek_forward
"""

# Grid (query blocks, B * Hkv): as the eager launch, query blocks fastest so that the programs
# running together share a KV head's keys in L2. Kernel options (constexprs): G, D, DV, BD, BDV,
# BM, BN, HAS_SEL, U64, NSAMP, LAZY, PRECISION as ``kernels.forward._sparsek_fwd``; WINDOW and
# QSCALE (scale * log2 e) are constants of the graph.
FORWARD = _HEADER + """
{{def_kernel("Q", "K", "V", "U", "TAU", "EVICT", "LISTS", "LSE")}}
    sqb, sqh, sqs, sqd = {{stride("Q")}}
    skb, skh, sks, skd = {{stride("K")}}
    svb, svh, svs, svd = {{stride("V")}}
    sub, suh, sus = {{stride("U")}}
    slb, slh, sls = {{stride("LSE")}}
    S = {{size("Q", 2)}}
    Hkv = {{size("K", 1)}}
    NB = {{size("LISTS", 1)}}
    L = {{size("LISTS", 2)}}
    # QSCALE as a float32 scalar, as the eager kernel's float argument: a bare constexpr float
    # times a bf16 tile would round the scale itself to bf16 first.
    qscale = tl.full([], QSCALE, tl.float32)
    o, lse, b, hq, qi, real = sparsek_forward.fwd_rows(
        Q, K, V, U, TAU, EVICT, LISTS, sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
        sub, suh, sus, S, L, NB, Hkv, WINDOW, qscale, tl.program_id(0), tl.program_id(1),
        G, D, DV, BD, BDV, BM, BN, HAS_SEL, U64, NSAMP, LAZY, PRECISION)
    tl.store(LSE + b * slb + hq * slh + qi.to(tl.int64) * sls, lse, mask=real)
    idx_b = b
    idx_h = hq[:, None]
    idx_m = qi[:, None]
    idx_d = tl.arange(0, BDV)[None, :]
    mask = real[:, None] & (idx_d < DV)
    {{store_output(("idx_b", "idx_h", "idx_m", "idx_d"), "o", "mask", val_shape=("BM", "BDV"))}}
"""

# The window keys' dk, dv (``kernels.backward._bwd_window_keys``): grid (key blocks, Hkv, B);
# dk [B, Hkv, S, D] is the output (float32 when the selected pairs' parts are added after, else
# k's dtype), dv goes to DVB (same layout). Kernel options: G, D, DV_, BD, BDV, BM, BN,
# PRECISION, WINDOW, SCALE.
WINDOW_KEYS = _HEADER + """
{{def_kernel("Q", "K", "V", "DO", "LSE", "SHIFT", "DVB")}}
    sqb, sqh, sqs, sqd = {{stride("Q")}}
    skb, skh, sks, skd = {{stride("K")}}
    svb, svh, svs, svd = {{stride("V")}}
    sdb, sdh, sds, sdd = {{stride("DO")}}
    swb, swh, sws, swd = {{stride("DVB")}}
    S = {{size("Q", 2)}}
    Hq = {{size("Q", 1)}}
    Hkv = {{size("K", 1)}}
    scale = tl.full([], SCALE, tl.float32)
    h = tl.program_id(1)
    b = tl.program_id(2)
    dk, dv, jc64, valid = sparsek_backward.window_key_cols(
        Q, K, V, DO, LSE, SHIFT, sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
        sdb, sdh, sds, sdd, S, Hq, Hkv, WINDOW, scale, tl.program_id(0), h, b,
        G, D, DV_, BD, BDV, BM, BN, PRECISION)
    offs_dv = tl.arange(0, BDV)
    tl.store(DVB + b.to(tl.int64) * swb + h.to(tl.int64) * swh + jc64[:, None] * sws + offs_dv[None, :] * swd,
             dv.to(DVB.dtype.element_ty), mask=valid[:, None] & (offs_dv[None, :] < DV_))
    idx_b = b
    idx_h = h
    idx_j = jc64[:, None]
    idx_d = tl.arange(0, BD)[None, :]
    mask = valid[:, None] & (idx_d < D)
    {{store_output(("idx_b", "idx_h", "idx_j", "idx_d"), "dk", "mask", val_shape=("BN", "BD"))}}
"""

# The query kernel's dq and c_i sums (``kernels.backward._bwd_query_block``): grid (query blocks,
# Hkv, B); dq [B, Hq, S, D] (q's dtype) is the output, the sums go to CROW [R, S, G] float64.
# Kernel options: G, D, DV_, BD, BDV, BM, BN, PRECISION, HAS_SEL, HAS_WIN, WINDOW, SCALE.
QUERY = _HEADER + """
{{def_kernel("Q", "K", "V", "DO", "LSE", "SHIFT", "U", "TAU", "EVICT", "FRAC", "LISTS", "COUNTS", "CROW")}}
    sqb, sqh, sqs, sqd = {{stride("Q")}}
    skb, skh, sks, skd = {{stride("K")}}
    svb, svh, svs, svd = {{stride("V")}}
    sdb, sdh, sds, sdd = {{stride("DO")}}
    S = {{size("Q", 2)}}
    Hq = {{size("Q", 1)}}
    Hkv = {{size("K", 1)}}
    NBQ = {{size("LISTS", 1)}}
    L = {{size("LISTS", 2)}}
    scale = tl.full([], SCALE, tl.float32)
    h = tl.program_id(1)
    b = tl.program_id(2)
    dq, c_acc, qi, g, real = sparsek_backward.query_rows(
        Q, K, V, DO, LSE, SHIFT, U, TAU, EVICT, FRAC, LISTS, COUNTS,
        sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
        S, L, NBQ, Hq, Hkv, WINDOW, scale, tl.program_id(0), h, b,
        G, D, DV_, BD, BDV, BM, BN, PRECISION, HAS_SEL, HAS_WIN)
    if HAS_SEL:
        r64 = (b * Hkv + h).to(tl.int64)
        tl.store(CROW + (r64 * S + qi) * G + g, c_acc, mask=real)
    idx_b = b
    idx_h = (h * G + g)[:, None]
    idx_m = qi[:, None]
    idx_d = tl.arange(0, BD)[None, :]
    mask = real[:, None] & (idx_d < D)
    {{store_output(("idx_b", "idx_h", "idx_m", "idx_d"), "dq", "mask", val_shape=("BM", "BD"))}}
"""
