"""Constant-memory generation: the SPARSEK KV cache and its decode step (issue 6).

Why it stays small (DESIGN.md section 3, facts 1 and 2): a query's candidates only grow, its
threshold ``tau`` never decreases, and a pair enters the top-k only at the moment it becomes a
candidate (when it leaves the window) and never returns once evicted. So a cache per KV head
needs only

* the window: the last ``window`` positions, a ring buffer (position p in slot ``p % window``);
* the selected pairs: ``topk`` slots, each with its key, value, score and position; a newcomer
  that outranks the lowest-ranked selected pair takes that pair's slot;
* the score state exact ``tau`` needs: the scores of the candidates that are not selected but
  still above ``tau`` (the *tail*). Their keys and values are never needed again, only their
  scores, because they still count in ``sum_j clip(u_j - tau, 0, 1) = topk``. A candidate whose
  score falls to ``tau`` or below counts for nothing from then on and is dropped.

The tail has a fixed capacity (``tail_capacity`` scores). It can only overflow when very many
candidates sit within 1 of ``tau`` (nearly tied scores); then the smallest tail scores are
dropped, ``tau`` comes out slightly low from then on, and ``SparseKCache.exact()`` says False
(``flags`` bit 0). Everything else is exact: token-by-token decoding gives the parallel op's
outputs (tests/test_cache.py).

State of one layer, for ``B`` sequences decoded in lockstep (one shared position) and ``H`` KV
heads, ``K = topk``, ``W = window``, ``T = tail_capacity``:

    k_win [B, H, W, D], v_win [B, H, W, Dv]   keys and values of the window (dtype of k)
    u_win [B, H, W] float64                  their scores (needed when they leave the window)
    k_sel [B, H, K, D], v_sel [B, H, K, Dv]   keys and values of the selected pairs
    u_sel [B, H, K] float64                  their scores, -inf in an empty slot
    pos_sel [B, H, K] int64                  their positions (ties go to the earlier), -1 if empty
    u_tail [B, H, T] float64                 scores of unselected candidates above tau, -inf if empty
    tau [B, H] float64                       threshold of the last query: -inf while there are
                                             at most topk candidates, NaN once a non-finite
                                             score became a candidate (poisoned, as the op)
    flags [B, H] int32                       bit 0: the tail overflowed (tau inexact since)
    pos [1] int64                            the position of the next token

``decode_torch`` is the PyTorch decode step (the CPU path, and the statement of the algorithm
the Triton kernel in ``kernels/decode.py`` implements); the op ``sparsek::decode``
(``library.py``) dispatches between them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import projection
from .cpu import compute_dtype

EMPTY = float("-inf")  # score of an empty slot
OVERFLOW = 1  # flags bit: the tail was full when a score had to be kept


def default_tail_capacity(topk: int) -> int:
    """Room for ``2 * topk`` unselected scores (at least 64): a few KB per KV head. It fills only
    when more than that many candidates lie within 1 of tau at once."""
    return 0 if topk == 0 else max(64, 2 * topk)


# ---------------------------------------------------------------------------- the state
class StateTensors:
    """A decode cache's tensors, named by ``TENSORS``: listing, bytes, static addresses."""

    TENSORS: tuple[str, ...] = ()

    def tensors(self) -> list[Tensor]:
        return [getattr(self, name) for name in self.TENSORS]

    def nbytes(self) -> int:
        """Bytes of all state tensors."""
        return sum(x.numel() * x.element_size() for x in self.tensors())

    def mark_static(self):
        """Tell dynamo the state tensors keep their addresses, so that a step compiled with
        ``mode="reduce-overhead"`` (CUDA graphs) may update them in place."""
        for x in self.tensors():
            torch._dynamo.mark_static_address(x)
        return self


class SparseKCache(StateTensors):
    """The decode state of one SPARSEK attention layer (the module docstring has the layout).

    Args:
        batch, kv_heads: B sequences (decoded in lockstep) and H KV heads.
        head_dim, v_head_dim: D and Dv (default D).
        topk, window: as in ``sparsek_attention`` (ints >= 0, not both 0).
        dtype, device: of the keys and values held.
        tail_capacity: scores of unselected candidates kept for exact tau (default
            ``default_tail_capacity(topk)``).

    Holds at most ``topk + window`` key/value pairs per KV head, however long the sequence.

        cache = SparseKCache(B, Hkv, D, topk=1024, window=1024, dtype=torch.bfloat16, device="cuda")
        cache.prefill(k, v, u)                 # the prompt's k, v [B, Hkv, P, D], u [B, Hkv, P]
        out = cache.decode(q, k1, v1, u1)      # one new token: q [B, Hq, 1, D] -> out [B, Hq, 1, Dv]
    """

    TENSORS = ("k_win", "v_win", "u_win", "k_sel", "v_sel", "u_sel", "pos_sel", "u_tail", "tau", "flags", "pos")

    def __init__(self, batch: int, kv_heads: int, head_dim: int, v_head_dim: int | None = None, *,
                 topk: int, window: int, dtype: torch.dtype = torch.float32, device=None,
                 tail_capacity: int | None = None):
        for name, x in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim), ("topk", topk),
                        ("window", window)):
            if isinstance(x, bool) or not isinstance(x, int) or x < (0 if name in ("topk", "window") else 1):
                raise ValueError(f"SparseKCache: {name} must be an int >= {0 if name in ('topk', 'window') else 1}, got {x!r}")
        if topk + window == 0:
            raise ValueError("SparseKCache: topk and window are both 0, so no query attends to anything")
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        tail_capacity = default_tail_capacity(topk) if tail_capacity is None else tail_capacity
        if isinstance(tail_capacity, bool) or not isinstance(tail_capacity, int) or tail_capacity < 0:
            raise ValueError(f"SparseKCache: tail_capacity must be an int >= 0, got {tail_capacity!r}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"SparseKCache: dtype must be float16, bfloat16, float32 or float64, got {dtype}")
        self.batch, self.kv_heads, self.head_dim, self.v_head_dim = batch, kv_heads, head_dim, v_head_dim
        self.topk, self.window, self.dtype = topk, window, dtype
        self.tail_capacity = tail_capacity if topk > 0 else 0
        B, H, K, W, T = batch, kv_heads, topk, window, self.tail_capacity
        f64 = dict(dtype=torch.float64, device=device)
        self.k_win = torch.zeros(B, H, W, head_dim, dtype=dtype, device=device)
        self.v_win = torch.zeros(B, H, W, v_head_dim, dtype=dtype, device=device)
        self.u_win = torch.zeros(B, H, W, **f64)
        self.k_sel = torch.zeros(B, H, K, head_dim, dtype=dtype, device=device)
        self.v_sel = torch.zeros(B, H, K, v_head_dim, dtype=dtype, device=device)
        self.u_sel = torch.full((B, H, K), EMPTY, **f64)
        self.pos_sel = torch.full((B, H, K), -1, dtype=torch.int64, device=device)
        self.u_tail = torch.full((B, H, T), EMPTY, **f64)
        self.tau = torch.full((B, H), EMPTY, **f64)
        self.flags = torch.zeros(B, H, dtype=torch.int32, device=device)
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.pos.device

    def reset(self) -> None:
        """Back to an empty sequence (in place: compiled steps and CUDA graphs keep working)."""
        for x in (self.k_win, self.v_win, self.u_win, self.k_sel, self.v_sel, self.flags, self.pos):
            x.zero_()
        for x in (self.u_sel, self.u_tail, self.tau):
            x.fill_(EMPTY)
        self.pos_sel.fill_(-1)

    # -- what it holds (these read values: a host sync on CUDA) --------------------------
    def length(self) -> int:
        """Tokens seen so far (prefill and decode)."""
        return int(self.pos.item())

    def pairs_held(self) -> Tensor:
        """[B, H] int64: key/value pairs held per KV head (selected slots in use plus window
        positions in use). Never more than topk + window."""
        sel = (self.pos_sel >= 0).sum(-1)
        return sel + min(self.length(), self.window)

    def exact(self) -> bool:
        """False once the tail overflowed for some sequence and head (tau inexact from then on)."""
        return not bool((self.flags & OVERFLOW).any())

    # -- filling it -------------------------------------------------------------------------
    def prefill(self, k: Tensor, v: Tensor, u: Tensor) -> None:
        """Build the state from a prompt's keys, values and scores (replacing what was held):
        k [B, H, P, D], v [B, H, P, Dv], u [B, H, P] any float dtype. The prompt's outputs come
        from the parallel op over it (``sparsek_attention``); this needs only k, v and u.
        O(P log P) per KV head (one sort); no host synchronisation."""
        self._check_kvu(k, v, u, "prefill", seq=None)
        self.reset()
        P, W, K = k.shape[2], self.window, self.topk
        if W > 0 and P > 0:
            m = min(P, W)
            slots = torch.arange(P - m, P, device=k.device) % W
            self.k_win[:, :, slots] = k[:, :, P - m:]
            self.v_win[:, :, slots] = v[:, :, P - m:]
            self.u_win[:, :, slots] = u[:, :, P - m:].to(torch.float64)
        n = max(0, P - W)  # candidates of the last prompt token: positions 0 .. n-1
        if K > 0 and n > 0:
            cand = u[:, :, :n].to(torch.float64)
            tau, _ = projection.threshold(cand, K)
            order = torch.sort(cand, dim=-1, descending=True, stable=True).indices  # ties: earlier first
            m = min(n, K)
            top = order[..., :m]
            self.u_sel[..., :m] = cand.gather(-1, top)
            self.pos_sel[..., :m] = top
            self.k_sel[:, :, :m] = k.gather(2, top[..., None].expand(-1, -1, -1, k.shape[-1]))
            self.v_sel[:, :, :m] = v.gather(2, top[..., None].expand(-1, -1, -1, v.shape[-1]))
            rest = cand.gather(-1, order[..., m:])  # the unselected, by descending score
            keep = rest > tau[..., None]
            T = min(self.tail_capacity, n - m)
            self.u_tail[..., :T] = torch.where(keep[..., :T], rest[..., :T], EMPTY)
            self.flags |= keep[..., T:].any(-1).to(torch.int32) * OVERFLOW
            self.tau.copy_(tau)
        self.pos.fill_(P)

    def decode(self, q: Tensor, k: Tensor, v: Tensor, u: Tensor, *, scale: float | None = None,
               backend: str = "auto") -> Tensor:
        """Attend one new token and add it to the state: q [B, Hq, 1, D], k [B, H, 1, D],
        v [B, H, 1, Dv], u [B, H, 1] -> out [B, Hq, 1, Dv] (the parallel op's output for this
        position). Validates shapes (never values), then calls ``sparsek::decode``."""
        self._check_kvu(k, v, u, "decode", seq=1)
        if not isinstance(q, Tensor) or q.dim() != 4:
            raise ValueError(f"SparseKCache.decode: q must be [batch, q_heads, 1, dim], got "
                             f"{tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__}")
        if (q.shape[0], q.shape[2], q.shape[3]) != (self.batch, 1, self.head_dim) or q.shape[1] % self.kv_heads:
            raise ValueError(f"SparseKCache.decode: q must be [{self.batch}, a multiple of {self.kv_heads}, 1, "
                             f"{self.head_dim}] for this cache, got {tuple(q.shape)}")
        if q.dtype != self.dtype or q.device != self.device:
            raise TypeError(f"SparseKCache.decode: q must be {self.dtype} on {self.device}, got {q.dtype} on {q.device}")
        scale = 1.0 / math.sqrt(self.head_dim) if scale is None else float(scale)
        from . import backends, library  # here: backends imports this module
        backends.check_name(backend)
        args = (q, k, v, u, *self.tensors()[:-1], self.pos, self.topk, self.window, scale)
        if torch.compiler.is_compiling():
            out = torch.ops.sparsek.decode(*args, backend)  # what dynamo traces and Inductor schedules
        else:
            # Eager: the op's own implementation, without the dispatcher. The dispatcher's
            # bookkeeping for 10 mutated tensors cost more than a whole GPU step (about 160 us a
            # call on a 2-core VM, where the step's kernels take about 20 us on an H100).
            out = library.decode_impl(backend, *args)
        self.pos.add_(1)
        return out

    def _check_kvu(self, k, v, u, fn: str, seq: int | None) -> None:
        where = f"SparseKCache.{fn}"
        for name, x, want in (("k", k, 4), ("v", v, 4), ("u", u, 3)):
            if not isinstance(x, Tensor) or x.dim() != want:
                raise ValueError(f"{where}: {name} must be a {want}-d tensor, got "
                                 f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        P = k.shape[2]
        want_k = (self.batch, self.kv_heads, P if seq is None else seq, self.head_dim)
        want_v = want_k[:3] + (self.v_head_dim,)
        shapes = f"k {tuple(k.shape)}, v {tuple(v.shape)}, u {tuple(u.shape)}"
        if tuple(k.shape) != want_k or tuple(v.shape) != want_v or tuple(u.shape) != want_k[:3]:
            raise ValueError(f"{where}: this cache wants k {want_k}, v {want_v}, u {want_k[:3]}; got {shapes}")
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise TypeError(f"{where}: k and v must be {self.dtype}, got k {k.dtype}, v {v.dtype}")
        if not u.dtype.is_floating_point:
            raise TypeError(f"{where}: u must be a floating-point tensor, got {u.dtype}")
        for name, x in (("k", k), ("v", v), ("u", u)):
            if x.device != self.device:
                raise ValueError(f"{where}: {name} is on {x.device}, the cache on {self.device}")


# ---------------------------------------------------------------------------- the decode step
def retained_threshold(z: Tensor, k: int) -> Tensor:
    """tau of the scores held, z [..., N] float64 with -inf in empty entries, more than k of them
    finite. Empty entries are moved 2 below the lowest held score: tau is above that score minus
    1, so they count 0 there and do not move the root (projection.threshold solves it exactly)."""
    finite = torch.isfinite(z)
    lowest = torch.where(finite, z, float("inf")).amin(-1, keepdim=True)
    return projection.threshold(torch.where(finite, z, lowest - 2), k)[0]


def _admit(ck: Tensor, cv: Tensor, cu: Tensor, c_pos: int, k_sel: Tensor, v_sel: Tensor, u_sel: Tensor,
           pos_sel: Tensor, u_tail: Tensor, tau: Tensor, flags: Tensor, topk: int) -> None:
    """Candidate c (ck [B, H, D], cv [B, H, Dv], cu [B, H] float64, position c_pos) joins the
    candidates: it takes the slot of the lowest-ranked selected pair if it outranks it (it is the
    latest candidate, so it loses ties), tau moves up, the tail keeps whichever of the two still
    counts. In place."""
    low = u_sel.amin(-1, keepdim=True)  # [B, H, 1]; an empty slot is -inf, so it goes first
    # the lowest-ranked selected pair: lowest score, and among equal scores the latest
    slot = torch.where(u_sel == low, pos_sel, -2).argmax(-1, keepdim=True)
    enters = cu[..., None] > low
    old_u = u_sel.gather(-1, slot)
    out_u = torch.where(enters, old_u, cu[..., None])  # the one outside the top-k now
    u_sel.scatter_(-1, slot, torch.where(enters, cu[..., None], old_u))
    pos_sel.scatter_(-1, slot, torch.where(enters, c_pos, pos_sel.gather(-1, slot)))
    for buf, new in ((k_sel, ck), (v_sel, cv)):
        idx = slot[..., None].expand(-1, -1, -1, buf.shape[-1])
        buf.scatter_(2, idx, torch.where(enters[..., None], new[:, :, None], buf.gather(2, idx)))
    if c_pos + 1 <= topk:  # at most topk candidates: all selected
        new_tau = torch.full_like(tau, EMPTY)
    else:
        new_tau = retained_threshold(torch.cat([u_sel, u_tail, out_u], -1), topk)
    new_tau = torch.where(~torch.isfinite(cu) | torch.isnan(tau), float("nan"), new_tau)
    tau.copy_(new_tau)
    if u_tail.shape[-1] == 0:
        flags |= (out_u[..., 0] > new_tau).to(torch.int32) * OVERFLOW
        return
    tail = torch.where(u_tail > new_tau[..., None], u_tail, EMPTY)  # what tau passed counts no more
    keep = out_u > new_tau[..., None]
    free = tail.argmin(-1, keepdim=True)  # an empty entry if there is one, else the smallest score
    there = tail.gather(-1, free)
    full = there > EMPTY
    tail.scatter_(-1, free, torch.where(keep & (out_u > there), out_u, there))
    u_tail.copy_(tail)
    flags |= (keep & full)[..., 0].to(torch.int32) * OVERFLOW


def window_positions(i: int | Tensor, window: int, device=None) -> Tensor:
    """Position held by each ring slot r once token i is in: the latest p <= i with p = r (mod
    window). [window] int64; negative means the slot is still empty."""
    r = torch.arange(window, device=device)
    return i - torch.remainder(i - r, window)


def attend(q: Tensor, k_win: Tensor, v_win: Tensor, k_sel: Tensor, v_sel: Tensor, u_sel: Tensor, tau: Tensor,
           i: int, window: int, scale: float) -> Tensor:
    """The new query's attention over the state (the new token already in the window):
    q [B, Hq, D] -> [B, Hq, Dv]. Selected pairs weigh ``clip(u - tau, 0, 1)`` (1 while tau is
    -inf), window pairs 1; a poisoned head (tau NaN) gives NaN."""
    B, Hq, D = q.shape
    H = tau.shape[1]
    G = Hq // H
    dt = compute_dtype(q.dtype)
    keys, vals, ps, valid = [], [], [], []
    if k_sel.shape[2] > 0:
        p = projection.weights(u_sel, tau[..., None])
        keys.append(k_sel), vals.append(v_sel), ps.append(p), valid.append(u_sel > EMPTY)
    if window > 0:
        held = window_positions(i, window, q.device) >= 0
        keys.append(k_win), vals.append(v_win)
        ps.append(torch.ones(B, H, window, dtype=torch.float64, device=q.device))
        valid.append(held.expand(B, H, window))
    kk, vv = torch.cat(keys, 2).to(dt), torch.cat(vals, 2).to(dt)
    p, ok = torch.cat(ps, 2), torch.cat(valid, 2)
    p = torch.where(ok, p, 0.0).to(dt)[:, :, None]  # [B, H, 1, N]
    s = scale * p * (q.view(B, H, G, D).to(dt) @ kk.transpose(-1, -2))  # [B, H, G, N]
    a = torch.softmax(s.masked_fill(~ok[:, :, None], float("-inf")), -1)
    o = (a * p) @ vv  # [B, H, G, Dv]
    o = torch.where(torch.isnan(tau)[:, :, None, None], float("nan"), o)
    return o.reshape(B, Hq, -1).to(q.dtype)


def decode_torch(q: Tensor, k: Tensor, v: Tensor, u: Tensor, k_win: Tensor, v_win: Tensor, u_win: Tensor,
                 k_sel: Tensor, v_sel: Tensor, u_sel: Tensor, pos_sel: Tensor, u_tail: Tensor, tau: Tensor,
                 flags: Tensor, pos: Tensor, topk: int, window: int, scale: float) -> Tensor:
    """One decode step in PyTorch (the CPU path of ``sparsek::decode``): the token at position
    ``pos`` (q [B, Hq, 1, D], k [B, H, 1, D], v [B, H, 1, Dv], u [B, H, 1]) enters the window;
    the token leaving the window (position pos - window) becomes a candidate (with window = 0
    the new token itself); then the new query attends. Updates the state in place (not pos) and
    returns out [B, Hq, 1, Dv]. Reads pos on the host."""
    i = int(pos.reshape(-1)[0])
    k1, v1, u1 = k[:, :, 0], v[:, :, 0], u[:, :, 0].to(torch.float64)
    if window > 0:
        s = i % window
        c = (k_win[:, :, s].clone(), v_win[:, :, s].clone(), u_win[:, :, s].clone(), i - window) if i >= window else None
        k_win[:, :, s], v_win[:, :, s], u_win[:, :, s] = k1, v1, u1
    else:
        c = (k1, v1, u1, i)
    if topk > 0 and c is not None:
        _admit(*c, k_sel, v_sel, u_sel, pos_sel, u_tail, tau, flags, topk)
    return attend(q[:, :, 0], k_win, v_win, k_sel, v_sel, u_sel, tau, i, window, scale)[:, :, None]
