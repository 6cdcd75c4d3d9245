"""Triton decode step of a ``SparseKCache``: the same state update and output as
``cache.decode_torch`` (the statement of the algorithm), with no host synchronisation (pos is
read by the kernels; grids and allocations depend only on shapes, topk and window), so a whole
step can be captured in a CUDA graph.

Three launches (two when the keys fit one split):

1. ``_update``, grid (B * H,): every state change of the step, one program per KV head. The
   token leaving the window ring (slot ``pos % window``, once ``pos >= window``) or, with
   window = 0, the new token itself is the candidate. It takes the slot of the lowest-ranked
   selected pair if it outranks it, tau is solved again over the retained scores
   (``_threshold``), the tail drops what tau passed and keeps the score pushed out of the top-k
   if it still counts (``_admit``, as ``cache._admit``), and the new token goes into its ring
   slot. This is serial work on at most ``topk + tail_capacity + 1`` scores with no parallelism
   across heads to exploit, so one program holds a head's scores as one register block and
   everything is a few block reductions.
2. ``_attend``, grid (B * H, NSPLIT): flash-decoding. One query per head attends to
   ``N = topk + window`` keys (the selected slots, then the ring): far too few programs for a
   GPU if a head were one program, so the keys are cut into NSPLIT pieces of ``keys_per_split``
   and each program writes a partial softmax (max, sum, unnormalised output) for the G query
   heads of its KV head, which share its keys (the rows of one ``tl.dot``, padded to 16).
   With a single split the program normalises and writes the output itself (no merge launch).
3. ``_merge``, grid (B * Hq,): combines the NSPLIT partials of one query head.

The tau solve (``_threshold``, float64 throughout): tau is the largest root of
``f(t) = sum_j clip(z_j - t, 0, 1) = topk`` over the retained finite scores z, with the slack
of ``projection.threshold`` (a point "has f >= topk" iff ``f >= topk - F_SLACK``). f is
piecewise linear with breakpoints at every z_j and z_j - 1. The solve keeps a bracket
``f(lo) >= topk - slack > f(hi)`` and shrinks it until no breakpoint lies strictly inside;
then f is linear on (lo, hi) and tau follows in closed form from lo, f(lo) and the slope.
Each step picks t in the bracket, finds the breakpoints nearest to t on either side (one
reduction) and evaluates f and its slope at both (one reduction). t is the Newton step from lo,
which is the root itself when no breakpoint lies in between; then f(up) follows from the line
through lo and needs no evaluation. Where f is flat right of lo, t is the next breakpoint; after
two steps that did not halve the bracket, its midpoint (so the steps stay within about three
times a bisection's). The old tau starts the bracket: while the tail holds every score that
counts, tau only moves up, by a little, and the usual step is one Newton step. (When the tail
overflowed, tau may move down: the old tau is then the bracket's hi.) On the GPU ``_update``
is bound by the per-score work of a head's one program (float64 over topk + tail scores): on an
H100 at topk = window = 1024 (default tail 2048), D = 128, bf16, B * H = 16, a CUDA-graphed
step takes about 21 us, of which ``_update`` 11, ``_attend`` 6, ``_merge`` 2 (at B * H = 128:
80 us, ``_attend`` 59, reading 128 MB of keys and values). Hence the single-pass reductions
(several values stacked with ``tl.join``) and the shortcut above.

Tensors (``cache.py`` has the layout; R = B * H, K = topk, W = window, T = tail capacity):
    q [B, Hq, 1, D], k [B, H, 1, D], v [B, H, 1, Dv], u [B, H, 1]: any strides; q, k, v one
        dtype (float16, bfloat16, float32; float64 takes ``cache.decode_torch``), u any float.
    state, contiguous: k_win [B, H, W, D], v_win [B, H, W, Dv] (dtype of k), u_win [B, H, W]
        float64, k_sel [B, H, K, D], v_sel [B, H, K, Dv], u_sel [B, H, K] float64,
        pos_sel [B, H, K] int64, u_tail [B, H, T] float64, tau [B, H] float64,
        flags [B, H] int32, pos [1] int64.
    workspace (float32, only when NSPLIT > 1): m, l [R, NSPLIT, G], acc [R, NSPLIT, G, Dv].
    out [B, Hq, 1, Dv] in the dtype of q.
Zero-size parts (K = 0, W = 0, T = 0) are switched off by constexpr flags: their pointers are
never touched. D and Dv are padded to powers of two (16 at least for the dots) with masks.

Ordering on a real GPU: within ``_update`` a thread may store an element that another thread
loaded (the ring slot the candidate leaves, the score blocks, tau, flags), so every load of
the state comes first, then one block barrier, then the stores. ``_attend`` reads the state
only after ``_update`` has finished (the next launch on the stream).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import cache, projection
from . import common

LOG2E = 1.4426950408889634
MAX_SOLVE_STEPS = 128  # a cap for pathological inputs; the safeguarded steps need far fewer
OVERFLOW: tl.constexpr = tl.constexpr(cache.OVERFLOW)
F_SLACK: tl.constexpr = tl.constexpr(projection.F_SLACK)
# f computed along a linear piece instead of evaluated is trusted this far from the slack
# threshold (its rounding is ~1e-12 at most)
LINEAR_MARGIN: tl.constexpr = tl.constexpr(1e-6)


# ------------------------------------------------------------------ the tau solve
# Several reductions over the same block are stacked along a new last axis (tl.join) and done
# as one: a thread holds the stacked values side by side, so the block pays one round of
# shuffles and barriers instead of one per value (and the interpreter one numpy call).
@triton.jit
def _min2(a, b):
    """(min a, min b) over the block, in one reduction (b in a's dtype)."""
    return tl.split(tl.min(tl.join(a, b.to(a.dtype)), 0))


@triton.jit
def _min4(a, b, c, d):
    """(min a, min b, min c, min d) over the block, in one reduction (all in a's dtype)."""
    ab, cd = tl.split(tl.min(tl.join(tl.join(a, b.to(a.dtype)), tl.join(c.to(a.dtype), d.to(a.dtype))), 0))
    ma, mb = tl.split(ab)
    mc, md = tl.split(cd)
    return ma, mb, mc, md


@triton.jit
def _f_at2(z, zm1, t_a, t_b):
    """f and its slope just right of two points t_a, t_b (scalars, may be +-inf), in one block
    reduction: ``f(t) = sum clip(z - t, 0, 1)`` and ``n(t) = |{z : z - 1 <= t < z}|`` (float64).
    Empty entries (-inf) count 0 with no mask (at t = -inf, ``-inf - t`` is NaN, which the
    NaN-dropping max turns into 0). n compares the breakpoints as computed (zm1 = z - 1), so on
    the final piece it counts exactly the fractional entries ``projection.threshold`` counts."""
    fa = tl.minimum(tl.maximum(z - t_a, 0.0), 1.0)
    fb = tl.minimum(tl.maximum(z - t_b, 0.0), 1.0)
    na = ((zm1 <= t_a) & (z > t_a)).to(tl.float64)
    nb = ((zm1 <= t_b) & (z > t_b)).to(tl.float64)
    f, n = tl.split(tl.sum(tl.join(tl.join(fa, fb), tl.join(na, nb)), 0))
    f_a, f_b = tl.split(f)
    n_a, n_b = tl.split(n)
    return f_a, f_b, n_a, n_b


@triton.jit
def _nearest_breakpoints(z, zm1, t, lo, hi):
    """The breakpoints strictly inside (lo, hi) nearest to t (lo <= t <= hi, lo finite): the
    smallest one >= t (+inf if none) and the largest one < t (-inf if none), in one block
    reduction. Empty entries (-inf) are never > lo."""
    up = tl.minimum(tl.where((z >= t) & (z > lo) & (z < hi), z, float("inf")),
                    tl.where((zm1 >= t) & (zm1 > lo) & (zm1 < hi), zm1, float("inf")))
    down = tl.maximum(tl.where((z < t) & (z > lo), z, float("-inf")),
                      tl.where((zm1 < t) & (zm1 > lo), zm1, float("-inf")))
    up, neg_down = _min2(up, -down)
    return up, -neg_down


@triton.jit
def _threshold(z, k, old_tau, zmin, zmax, MAX_STEPS: tl.constexpr):
    """(tau, steps): tau of the scores z [BZ] float64 (-inf: empty; more than k finite ones, the
    lowest zmin, the highest zmax; k int >= 1), given the tau of the step before (old_tau,
    finite or -inf), and the bracketing steps it took. The module docstring has the method."""
    kf = k.to(tl.float64)
    kmin = kf - F_SLACK
    zm1 = z - 1.0
    # lo = old tau if f still reaches k there, else the lowest breakpoint (f = number of scores)
    t0 = tl.where(old_tau > float("-inf"), old_tau, zmin - 1.0)
    f0, f1, n0, n1 = _f_at2(z, zm1, t0, zmin - 1.0)
    ok0 = f0 >= kmin
    lo = tl.where(ok0, t0, zmin - 1.0)
    f_lo = tl.where(ok0, f0, f1)
    n_lo = tl.where(ok0, n0, n1)
    hi = tl.where(ok0, zmax, tl.minimum(t0, zmax))  # f(zmax) = 0 < k
    # Steps in a row that did not halve the bracket; a cold start (no old tau: lo is far from
    # the root) begins with midpoints.
    warm = old_tau > float("-inf")
    slow = tl.where(warm, 0, 2)
    # The old tau above the root (the tail overflowed): the root is usually just below it, so
    # the first step looks there.
    below_old = warm & ~ok0
    done = slow < 0
    steps = tl.full((), 0, tl.int32)
    while (steps < MAX_STEPS) & ~done:
        # Newton from lo: the root itself if no breakpoint lies in between. Where f is flat
        # right of lo, the next breakpoint (f falls again from there). After two steps that did
        # not halve the bracket, the midpoint.
        t = tl.where(n_lo > 0, lo + (f_lo - kf) / tl.maximum(n_lo, 1.0), lo)
        t = tl.where(slow >= 2, 0.5 * (lo + hi), tl.minimum(tl.maximum(t, lo), hi))
        t = tl.where((steps == 0) & below_old, hi, t)
        up, down = _nearest_breakpoints(z, zm1, t, lo, hi)
        has_up = up < float("inf")
        has_down = down > float("-inf")
        width = hi - lo
        # No breakpoint in (lo, t): f is linear on [lo, up] with slope -n_lo, so f(up) needs no
        # evaluation when it is clearly below k (the usual end: Newton landed on the root).
        linear = ~has_down & (~has_up | (f_lo - n_lo * (up - lo) < kmin - LINEAR_MARGIN))
        if linear:
            hi = tl.where(has_up, up, hi)
            done = linear
        else:
            f_up, f_down, n_up, n_down = _f_at2(z, zm1, up, down)
            up_in = has_up & (f_up >= kmin)  # the root lies right of up
            down_out = has_down & (f_down < kmin)  # the root lies left of down
            # neither: no breakpoint between (down or lo) and (up or hi), which bracket the root
            done = ~up_in & ~down_out
            to_down = done & has_down  # lo moves to down (f >= k there)
            lo, f_lo, n_lo = (tl.where(up_in, up, tl.where(to_down, down, lo)),
                              tl.where(up_in, f_up, tl.where(to_down, f_down, f_lo)),
                              tl.where(up_in, n_up, tl.where(to_down, n_down, n_lo)))
            hi = tl.where(down_out, down, tl.where(~up_in & has_up, up, hi))
        slow = tl.where((hi - lo) > 0.5 * width, slow + 1, 0)
        steps += 1
    # f is linear on (lo, hi) with slope -n_lo; n_lo = 0: flat, lo is the largest root found
    tau = tl.where(n_lo > 0, lo + (f_lo - kf) / tl.maximum(n_lo, 1.0), lo)
    return tl.minimum(tl.maximum(tau, lo), hi), steps


# ------------------------------------------------------------------ kernel 1: the state update
@triton.jit
def _load_scores(U_SEL, POS_SEL, U_TAIL, r64, topk, T, BZ: tl.constexpr, HAS_TAIL: tl.constexpr):
    """The scores of KV head r64 as one block u_all [BZ] float64: u_sel at [0, topk), u_tail at
    [topk, topk + T), -inf elsewhere; and pos_all [BZ] int64: pos_sel at [0, topk)."""
    idx = tl.arange(0, BZ)
    in_sel = idx < topk
    u_all = tl.load(U_SEL + r64 * topk + idx, mask=in_sel, other=float("-inf"))
    if HAS_TAIL:
        in_tail = (idx >= topk) & (idx < topk + T)
        u_all = tl.where(in_sel, u_all, tl.load(U_TAIL + r64 * T + (idx - topk), mask=in_tail, other=float("-inf")))
    pos_all = tl.load(POS_SEL + r64 * topk + idx, mask=in_sel, other=-1)
    return u_all, pos_all


@triton.jit
def _admit(ck, cv, cu, c_pos, u_all, pos_all, old_tau, flags, offs_d, offs_dv,
           K_SEL, V_SEL, U_SEL, POS_SEL, U_TAIL, TAU, FLAGS, r64, topk, T,
           D: tl.constexpr, DV: tl.constexpr, BZ: tl.constexpr, HAS_TAIL: tl.constexpr, MAX_STEPS: tl.constexpr):
    """``cache._admit`` for KV head r64: candidate ck [BD], cv [BDV] (the cache's dtype), score
    cu (float64), position c_pos; u_all, pos_all from ``_load_scores``, old_tau and flags the
    head's, all read before any thread of the program writes."""
    idx = tl.arange(0, BZ)
    in_sel = idx < topk
    in_tail = (idx >= topk) & (idx < topk + T)
    # The lowest-ranked selected pair: lowest score, the latest among equal ones (empty slots:
    # -inf and position -1, so the first empty slot). A NaN score (only a poisoned prefill puts
    # one there) makes the lowest score NaN, as torch's amin: then nothing enters. The same
    # reduction finds the lowest and highest held scores for the tau solve.
    held = u_all > float("-inf")
    low, no_nan, zmin, neg_zmax = _min4(tl.where(in_sel, u_all, float("inf")),
                                        tl.where(in_sel & (u_all != u_all), 0.0, 1.0),
                                        tl.where(held, u_all, float("inf")), tl.where(held, -u_all, float("inf")))
    slot = tl.argmax(tl.where(in_sel & (u_all == low), pos_all, -3), 0)
    enters = (cu > low) & (no_nan > 0.0)  # the newcomer loses ties
    out_u = tl.where(enters, low, cu)  # the score pushed out of the top-k
    row = r64 * topk + slot
    # (tl.where(scalar, block, False) rather than scalar & block: the interpreter cannot
    # broadcast a scalar bool)
    tl.store(U_SEL + row, cu, mask=enters)
    tl.store(POS_SEL + row, c_pos.to(tl.int64), mask=enters)
    tl.store(K_SEL + row * D + offs_d, ck, mask=tl.where(enters, offs_d < D, False))
    tl.store(V_SEL + row * DV + offs_dv, cv, mask=tl.where(enters, offs_dv < DV, False))
    # tau of the retained scores: the selected ones (the candidate in), the tail, the pushed-out
    # one; as a multiset, u_all and the candidate
    z = tl.where(tl.where(enters, idx == slot, False), cu, u_all)
    z = tl.where(idx == topk + T, out_u, z)
    poisoned = (cu != cu) | (tl.abs(cu) == float("inf")) | (old_tau != old_tau)
    new_tau = tl.full((), float("-inf"), tl.float64)
    if (c_pos + 1 > topk) & ~poisoned:  # at most topk candidates: all selected, tau = -inf
        new_tau, _ = _threshold(z, topk, old_tau, tl.minimum(zmin, cu), tl.maximum(-neg_zmax, cu),
                                MAX_STEPS)
    new_tau = tl.where(poisoned, float("nan"), new_tau)
    tl.store(TAU + r64, new_tau)
    # The tail drops what tau passed and keeps the pushed-out score if it still counts: in an
    # empty entry, else over the smallest score if larger (first index among equal ones).
    if HAS_TAIL:
        tail = tl.where(in_tail & (u_all > new_tau), u_all, float("-inf"))
        keep = out_u > new_tau
        there, free = tl.min(tl.where(in_tail, tail, float("inf")), 0, return_indices=True,
                             return_indices_tie_break_left=True)
        full = there > float("-inf")
        tail = tl.where(idx == free, tl.where(keep & (out_u > there), out_u, there), tail)
        tl.store(U_TAIL + r64 * T + (idx - topk), tail, mask=in_tail)
        overflow = keep & full
    else:
        overflow = out_u > new_tau  # no tail at all: every score that still counts is lost
    tl.store(FLAGS + r64, flags | tl.where(overflow, OVERFLOW, 0))


@triton.jit
def _update(
    K, V, U, K_WIN, V_WIN, U_WIN, K_SEL, V_SEL, U_SEL, POS_SEL, U_TAIL, TAU, FLAGS, POS,
    skb, skh, skd, svb, svh, svd, sub, suh,
    H, topk, window, T,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BZ: tl.constexpr,
    HAS_WIN: tl.constexpr, HAS_SEL: tl.constexpr, HAS_TAIL: tl.constexpr, MAX_STEPS: tl.constexpr,
):
    """The state update of KV head ``r = b * H + h`` for the token at position pos."""
    r64 = tl.program_id(0).to(tl.int64)
    b = r64 // H
    h = r64 % H
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    dmask = offs_d < D
    dvmask = offs_dv < DV
    i = tl.load(POS)
    nk = tl.load(K + b * skb + h * skh + offs_d * skd, mask=dmask, other=0.0)
    nv = tl.load(V + b * svb + h * svh + offs_dv * svd, mask=dvmask, other=0.0)
    nu = tl.load(U + b * sub + h * suh).to(tl.float64)
    if HAS_SEL:  # (independent of pos: these loads overlap the candidate's)
        u_all, pos_all = _load_scores(U_SEL, POS_SEL, U_TAIL, r64, topk, T, BZ, HAS_TAIL)
        old_tau = tl.load(TAU + r64)
        flags = tl.load(FLAGS + r64)
    if HAS_WIN:
        # the candidate: the token leaving ring slot i % window (none while the ring fills)
        wrow = r64 * window + i % window
        ck = tl.load(K_WIN + wrow * D + offs_d, mask=dmask, other=0.0)
        cv = tl.load(V_WIN + wrow * DV + offs_dv, mask=dvmask, other=0.0)
        cu = tl.load(U_WIN + wrow)
        c_pos = i - window
    else:  # the candidate: the new token itself
        ck, cv, cu, c_pos = nk.to(K_SEL.dtype.element_ty), nv.to(V_SEL.dtype.element_ty), nu, i
    # Every thread has read the state before any thread writes it (a thread may store an
    # element that another one loaded).
    tl.debug_barrier()
    if HAS_SEL:
        if c_pos >= 0:
            _admit(ck, cv, cu, c_pos, u_all, pos_all, old_tau, flags, offs_d, offs_dv,
                   K_SEL, V_SEL, U_SEL, POS_SEL, U_TAIL, TAU, FLAGS, r64, topk, T, D, DV, BZ, HAS_TAIL, MAX_STEPS)
    if HAS_WIN:
        tl.store(K_WIN + wrow * D + offs_d, nk.to(K_WIN.dtype.element_ty), mask=dmask)
        tl.store(V_WIN + wrow * DV + offs_dv, nv.to(V_WIN.dtype.element_ty), mask=dvmask)
        tl.store(U_WIN + wrow, nu)


# ------------------------------------------------------------------ kernel 2: split attention
@triton.jit
def _rows(SEL, WIN, r64, j, is_sel, is_win, topk, window, offs, WIDTH: tl.constexpr,
          HAS_SEL: tl.constexpr, HAS_WIN: tl.constexpr):
    """[BN, len(offs)] rows j of head r64's keys (or values), rows of WIDTH elements: selected
    slot j for j < topk, ring slot j - topk after; zeros elsewhere."""
    omask = offs[None, :] < WIDTH
    x = tl.zeros([j.shape[0], offs.shape[0]], SEL.dtype.element_ty)
    if HAS_SEL:
        x = tl.load(SEL + (r64 * topk + j[:, None]) * WIDTH + offs[None, :], mask=is_sel[:, None] & omask, other=0.0)
    if HAS_WIN:
        xw = tl.load(WIN + (r64 * window + (j[:, None] - topk)) * WIDTH + offs[None, :],
                     mask=is_win[:, None] & omask, other=0.0)
        x = tl.where(is_win[:, None], xw, x)
    return x


@triton.jit
def _attend(
    Q, K_SEL, V_SEL, U_SEL, K_WIN, V_WIN, TAU, POS, OUT, WS_M, WS_L, WS_ACC,
    sqb, sqh, sqd, H, topk, window, qscale,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BG: tl.constexpr, BN: tl.constexpr, KPS: tl.constexpr, NSPLIT: tl.constexpr,
    HAS_SEL: tl.constexpr, HAS_WIN: tl.constexpr, PRECISION: tl.constexpr,
):
    """Keys [sp * KPS, (sp + 1) * KPS) of KV head r for its G query heads (rows of the tile)."""
    r = tl.program_id(0)
    sp = tl.program_id(1)
    r64 = r.to(tl.int64)
    b = r64 // H
    h = r64 % H
    g = tl.arange(0, BG)
    rows = g < G
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q = tl.load(Q + b * sqb + (h * G + g[:, None]) * sqh + offs_d[None, :] * sqd,
                mask=rows[:, None] & (offs_d[None, :] < D), other=0.0)
    tau = tl.load(TAU + r64)
    i = tl.load(POS)
    m_i = tl.full([BG], float("-inf"), tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, BDV], tl.float32)
    for j0 in tl.static_range(0, KPS, BN):
        j = sp * KPS + j0 + tl.arange(0, BN)
        is_sel = j < 0
        is_win = j < 0
        if HAS_SEL:
            is_sel = j < topk
        if HAS_WIN:
            is_win = (j >= topk) & (j < topk + window)
        kt = _rows(K_SEL, K_WIN, r64, j, is_sel, is_win, topk, window, offs_d, D, HAS_SEL, HAS_WIN)
        vt = _rows(V_SEL, V_WIN, r64, j, is_sel, is_win, topk, window, offs_dv, DV, HAS_SEL, HAS_WIN)
        # ring slot j - topk is empty until position j - topk has come (it holds position
        # i - ((i - slot) mod window), which is >= 0 iff slot <= i)
        valid = is_win & (j - topk <= i)
        p = tl.full([BN], 1.0, tl.float32)
        if HAS_SEL:
            u = tl.load(U_SEL + r64 * topk + j, mask=is_sel, other=float("-inf"))
            # float64 subtraction: scores of 1e4 keep their fractional part; tau = -inf gives 1.
            # A poisoned head (tau NaN) is set to NaN by whoever writes its output.
            p = tl.where(is_sel, common.clip01_num(u - tau).to(tl.float32), p)
            valid = valid | (is_sel & (u > float("-inf")))
        p = tl.where(valid, p, 0.0)  # finite weights: masked keys add exactly 0
        s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * (qscale * p)[None, :]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_i, l_i, acc = common.softmax_step_exp2(m_i, l_i, acc, s, p[None, :], vt, PRECISION)
    if NSPLIT == 1:  # the whole answer: normalise and write it here, no merge launch
        o = acc / l_i[:, None]
        o = tl.where(tau != tau, float("nan"), o)
        tl.store(OUT + ((b * H + h) * G + g[:, None]) * DV + offs_dv[None, :], o.to(OUT.dtype.element_ty),
                 mask=rows[:, None] & (offs_dv[None, :] < DV))
    else:
        part = (r64 * NSPLIT + sp) * G + g
        tl.store(WS_M + part, m_i, mask=rows)
        tl.store(WS_L + part, l_i, mask=rows)
        tl.store(WS_ACC + part[:, None] * DV + offs_dv[None, :], acc, mask=rows[:, None] & (offs_dv[None, :] < DV))


# ------------------------------------------------------------------ kernel 3: merge the splits
@triton.jit
def _merge(WS_M, WS_L, WS_ACC, TAU, OUT, G: tl.constexpr, NSPLIT: tl.constexpr, DV: tl.constexpr,
           BS: tl.constexpr, BDV: tl.constexpr):
    """Query head ``pid = (b * H + h) * G + g``: combine its NSPLIT partial softmaxes (base 2)."""
    pid = tl.program_id(0).to(tl.int64)
    r = pid // G
    g = pid % G
    sp = tl.arange(0, BS)
    smask = sp < NSPLIT
    offs_dv = tl.arange(0, BDV)
    part = (r * NSPLIT + sp) * G + g
    m = tl.load(WS_M + part, mask=smask, other=float("-inf"))
    l = tl.load(WS_L + part, mask=smask, other=0.0)
    acc = tl.load(WS_ACC + part[:, None] * DV + offs_dv[None, :], mask=smask[:, None] & (offs_dv[None, :] < DV),
                  other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # a split that saw nothing: 0
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tau = tl.load(TAU + r)
    o = tl.where(tau != tau, float("nan"), o)
    tl.store(OUT + pid * DV + offs_dv, o.to(OUT.dtype.element_ty), mask=offs_dv < DV)


# ------------------------------------------------------------------ Python side
MAX_SPLITS = 32  # splits per head for large caches: B * H * 32 programs, a few hundred at B * H = 16


@dataclass(frozen=True)
class Config:
    """Launch configuration of ``_attend``: block_n keys per dot, keys_per_split keys per program
    (a multiple of block_n)."""

    block_n: int
    keys_per_split: int
    num_warps: int = 4
    num_stages: int = 1


def config(N: int, D: int, Dv: int, dtype: torch.dtype, G: int) -> Config:
    """Chunks of 64 keys (32 for float32 or head dims over 128, whose [BN, D] tiles take twice
    the registers); at most MAX_SPLITS splits per head, at least one chunk each, so a cache of
    topk = window = 1024 has 32 splits of 64 keys and one of <= 64 keys a single split.
    Timed on an H100 (topk = window = 1024, D = 128, bf16, B * H = 16 and 128): programs of 64
    keys beat longer ones (128 to 512 keys in a pipelined loop were 10-40% slower), and 2 warps
    beat 4 and 8 by a few percent."""
    block_n = 32 if dtype == torch.float32 or max(D, Dv) > 128 else 64
    keys = max(block_n, triton.next_power_of_2(triton.cdiv(N, MAX_SPLITS)))
    return Config(block_n, keys, num_warps=2 if block_n == 64 else 4)


def _update_warps(BZ: int) -> int:
    """Warps of ``_update`` for a score block of BZ (from H100 timings: its time goes to the
    per-score work of one program, so more warps help up to about 8-16 scores per thread)."""
    return 4 if BZ <= 512 else 8 if BZ <= 4096 else 16


def decode(q: Tensor, k: Tensor, v: Tensor, u: Tensor, k_win: Tensor, v_win: Tensor, u_win: Tensor,
           k_sel: Tensor, v_sel: Tensor, u_sel: Tensor, pos_sel: Tensor, u_tail: Tensor, tau: Tensor,
           flags: Tensor, pos: Tensor, topk: int, window: int, scale: float) -> Tensor:
    """Same contract as ``cache.decode_torch`` (the state updated in place, not pos; out
    [B, Hq, 1, Dv] in q's dtype), with no host synchronisation: 2 or 3 launches whose grids
    depend only on shapes, topk and window (``config`` picks the splits). float64 takes
    ``cache.decode_torch`` (the kernels keep float32 softmax state)."""
    if q.dtype == torch.float64:
        return cache.decode_torch(q, k, v, u, k_win, v_win, u_win, k_sel, v_sel, u_sel, pos_sel, u_tail, tau,
                                  flags, pos, topk, window, scale)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton decode: q, k, v must be float16, bfloat16, float32 or float64, got {q.dtype}")
    state = (k_win, v_win, u_win, k_sel, v_sel, u_sel, pos_sel, u_tail, tau, flags)
    if not all(x.is_contiguous() for x in state):
        raise ValueError("triton decode: the state tensors must be contiguous (as SparseKCache makes them)")
    B, Hq, _, D = q.shape
    H, Dv, T = k.shape[1], v.shape[-1], u_tail.shape[-1]
    G = Hq // H
    R = B * H
    out = torch.empty(B, Hq, 1, Dv, dtype=q.dtype, device=q.device)
    if R == 0:
        return out
    has_sel, has_win, has_tail = topk > 0, window > 0, topk > 0 and T > 0
    # stand-ins for the zero-size parts (same dtypes; never touched: the constexpr flags are off)
    ks, vs, us, ps = (k_sel, v_sel, u_sel, pos_sel) if has_sel else (k_win, v_win, u_win, pos)
    kw, vw, uw = (k_win, v_win, u_win) if has_win else (k_sel, v_sel, u_sel)
    ut = u_tail if has_tail else tau
    BZ = triton.next_power_of_2(topk + T + 1)
    _update[(R,)](
        k, v, u, kw, vw, uw, ks, vs, us, ps, ut, tau, flags, pos,
        k.stride(0), k.stride(1), k.stride(3), v.stride(0), v.stride(1), v.stride(3), u.stride(0), u.stride(1),
        H, topk, window, T,
        D=D, DV=Dv, BD=triton.next_power_of_2(D), BDV=triton.next_power_of_2(Dv), BZ=BZ,
        HAS_WIN=has_win, HAS_SEL=has_sel, HAS_TAIL=has_tail, MAX_STEPS=MAX_SOLVE_STEPS,
        num_warps=_update_warps(BZ),
    )
    N = topk + window
    cfg = config(N, D, Dv, q.dtype, G)
    nsplit = triton.cdiv(N, cfg.keys_per_split)
    BDV = common.dot_width(Dv)
    if nsplit > 1:
        ws_m = torch.empty(R, nsplit, G, dtype=torch.float32, device=q.device)
        ws_l = torch.empty_like(ws_m)
        ws_acc = torch.empty(R, nsplit, G, Dv, dtype=torch.float32, device=q.device)
    else:
        ws_m = ws_l = ws_acc = out  # not used
    _attend[(R, nsplit)](
        q, ks, vs, us, kw, vw, tau, pos, out, ws_m, ws_l, ws_acc,
        q.stride(0), q.stride(1), q.stride(3), H, topk, window, scale * LOG2E,
        G=G, D=D, DV=Dv, BD=common.dot_width(D), BDV=BDV,
        BG=common.dot_width(G), BN=cfg.block_n, KPS=cfg.keys_per_split, NSPLIT=nsplit,
        HAS_SEL=has_sel, HAS_WIN=has_win, PRECISION="ieee",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if nsplit > 1:
        _merge[(B * Hq,)](ws_m, ws_l, ws_acc, tau, out, G=G, NSPLIT=nsplit, DV=Dv,
                          BS=triton.next_power_of_2(nsplit), BDV=BDV)
    return out
