"""Triton forward of SPARSEK attention: one program per (block of BM queries, query head).

The program walks the block's gather list (selected pairs, ``selection.block_lists``) and then
its window span, keeping one online softmax over both (DESIGN.md section 3, fact 3). Weights
``p = clip(u_j - tau_i, 0, 1)`` are formed in float64 from scores and thresholds shifted by the
block's first tau, then used in float32, so that large scores keep their precision.

First version, correctness before speed: the dots run in the input dtype (tensor cores for
bf16/fp16, IEEE float32 for float32: no TF32), with float32 accumulation and softmax; the G query heads of a group are separate programs (no reuse of
the gathered keys yet), tile sizes are fixed, and the selection runs in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..cpu import lse_dtype
from ..selection import select


@triton.jit
def _softmax_step(m_i, l_i, acc, s, w, v, PRECISION: tl.constexpr):
    """One step of the online softmax over a tile of logits s [BM, BN] (-inf: not attended):
    the running max m_i, sum l_i and output acc, with the weights multiplied by w (p, or 1)
    before they meet the values v [BN, DV]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    e = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(e, 1)
    acc = acc * alpha[:, None] + tl.dot((e * w).to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _sparsek_fwd(
    Q, K, V, U, TAU, EVICT, LISTS, OUT, LSE,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
    S, L, NB, Hq, Hkv, G, window, scale,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    hq = pid_bh % Hq
    h = hq // G
    r = b * Hkv + h
    offs_m = pid_m * BM + tl.arange(0, BM)
    in_seq = offs_m < S
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q = tl.load(Q + b * sqb + hq * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=in_seq[:, None] & (offs_d[None, :] < D), other=0.0)
    q = (q * scale).to(Q.dtype.element_ty)  # dots in the input dtype (tensor cores for bf16/fp16)
    tau = tl.load(TAU + r * S + tl.minimum(offs_m, S - 1))  # float64
    shift = tl.load(TAU + r * S + tl.minimum(pid_m * BM, S - 1))
    shift = tl.where(shift == shift, shift, 0.0)  # NaN (poisoned block): no shift
    shift = tl.where(shift == float("-inf"), 0.0, shift)
    tau_s = (tau - shift).to(tl.float32)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    kbase = K + b * skb + h * skh
    vbase = V + b * svb + h * svh
    # Selected pairs of this block.
    for start in range(0, L, BN):
        offs_n = start + tl.arange(0, BN)
        j = tl.load(LISTS + (r * NB + pid_m) * L + offs_n, mask=offs_n < L, other=-1)
        valid = j >= 0
        jc = tl.where(valid, j, 0)
        kj = tl.load(kbase + jc[:, None] * sks + offs_d[None, :] * skd,
                     mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
        vj = tl.load(vbase + jc[:, None] * svs + offs_dv[None, :] * svd,
                     mask=valid[:, None] & (offs_dv[None, :] < DV), other=0.0)
        uj = tl.load(U + r * S + jc, mask=valid, other=0.0)  # float64
        stop = tl.load(EVICT + r * S + jc, mask=valid, other=0)
        u_s = (uj - shift).to(tl.float32)
        x = u_s[None, :] - tau_s[:, None]
        # clip(x, 0, 1) that keeps NaN (a poisoned query must come out NaN); tau = -inf gives 1.
        p = tl.where(x != x, x, tl.minimum(tl.maximum(x, 0.0), 1.0))
        ok = valid[None, :] & (jc[None, :] + window <= offs_m[:, None]) & (offs_m[:, None] < stop[None, :])
        s = tl.dot(q, tl.trans(kj), input_precision=PRECISION) * p
        s = tl.where(ok, s, float("-inf"))
        m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, p, vj, PRECISION)
    # Window span of this block: positions pid_m*BM - window + 1 .. pid_m*BM + BM - 1.
    if window > 0:
        lo = pid_m * BM - window + 1
        for start in range(0, window + BM - 1, BN):
            pos = lo + start + tl.arange(0, BN)
            valid = (pos >= 0) & (pos < S)
            pc = tl.where(valid, pos, 0)
            kj = tl.load(kbase + pc[:, None] * sks + offs_d[None, :] * skd,
                         mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
            vj = tl.load(vbase + pc[:, None] * svs + offs_dv[None, :] * svd,
                         mask=valid[:, None] & (offs_dv[None, :] < DV), other=0.0)
            ok = valid[None, :] & (pos[None, :] <= offs_m[:, None]) & (pos[None, :] > offs_m[:, None] - window)
            s = tl.dot(q, tl.trans(kj), input_precision=PRECISION)
            s = tl.where(ok, s, float("-inf"))
            m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, 1.0, vj, PRECISION)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(OUT + b * sob + hq * soh + offs_m[:, None] * sos + offs_dv[None, :] * sod,
             o.to(OUT.dtype.element_ty), mask=in_seq[:, None] & (offs_dv[None, :] < DV))
    lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf"))
    tl.store(LSE + (b * Hq + hq) * S + offs_m, lse, mask=in_seq)


BLOCK_M = 32
BLOCK_N = 32


def forward(q: Tensor, k: Tensor, v: Tensor, u: Tensor, topk: int, window: int, scale: float,
            block_m: int = BLOCK_M) -> tuple[Tensor, Tensor]:
    """Same contract as ``cpu.forward``."""
    B, Hq, S, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    out = torch.empty(B, Hq, S, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    if S == 0:
        return out, lse.to(lse_dtype(q.dtype))
    R = B * Hkv
    NB = -(-S // block_m)
    if topk > 0:
        sel = select(u, topk, window, block_m, fractional=False)
        tau = sel.tau.contiguous()
        evict = sel.evict.to(torch.int32).contiguous()
        lists = sel.block_index.to(torch.int32).contiguous()
        L = lists.shape[-1]
    else:
        tau = torch.zeros(R, S, dtype=torch.float64, device=q.device)
        evict = torch.zeros(R, S, dtype=torch.int32, device=q.device)
        lists = torch.zeros(1, dtype=torch.int32, device=q.device)
        L = 0
    u64 = u.detach().reshape(R, S).to(torch.float64).contiguous()
    grid = (NB, B * Hq)
    _sparsek_fwd[grid](
        q, k, v, u64, tau, evict, lists, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        S, L, NB, Hq, Hkv, Hq // Hkv, window, scale,
        D=D, DV=Dv, BD=max(16, triton.next_power_of_2(D)), BDV=max(16, triton.next_power_of_2(Dv)),
        BM=block_m, BN=BLOCK_N, PRECISION="ieee",
    )
    return out, lse.to(lse_dtype(q.dtype))
