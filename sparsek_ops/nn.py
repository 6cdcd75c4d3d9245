"""``SparseKAttention``: the layer users drop into a model (DESIGN.md section 1).

x [B, S, d_model] -> q, k, v projections (GQA: n_kv_heads <= n_heads), rotary position
embedding on q and k, one importance score per KV head and position from the scoring network,
``sparsek_attention`` (each query: its ``topk`` best-scored earlier pairs plus a sliding window of
``window`` recent ones, one softmax), output projection -> [B, S, d_model].

Scoring network: ``u = x @ w_score + b_score + slope * position`` (float32, one score per KV
head). A fresh layer has ``w_score = 0``, ``b_score = 0`` and ``slope = SLOPE_INIT`` > 0, so later
positions score higher and the top-k are the most recent candidates: the layer starts as sliding
window attention over ``topk + window`` positions and learns away from it through the score
gradient (pairs within 1 / slope of the threshold are fractional, so u gets gradient from the
first step on; a slope of 1 or more would make every weight 0 or 1 and the gradient vanish).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import selection
from .api import sparsek_attention
from .cache import SparseKCache

# Score gap between neighbours at init: about 1 / SLOPE_INIT = 20 fractional pairs per query. The
# demo's scorer stayed on the recent band at 0.25 and learned to keep chosen tokens at 0.05
# (validation loss 2.297 -> 2.271 after 200 steps; README, "The main job's result").
SLOPE_INIT = 0.05


def positions(S: int, device, start: Tensor | None = None) -> Tensor:
    """Positions of S consecutive tokens, [S] float32: the index, plus ``start`` ([1] int64
    tensor, e.g. a cache's position: a tensor, so that a compiled decode step does not
    recompile per position)."""
    pos = torch.arange(S, device=device, dtype=torch.float32)
    return pos if start is None else pos + start.to(torch.float32)


def rotary(x: Tensor, base: float = 10000.0, start: Tensor | None = None) -> Tensor:
    """Rotary position embedding of x [B, H, S, hd] (hd even), in the dtype of x (angles in
    float32), at ``positions(S, start)``."""
    S, hd = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    ang = positions(S, x.device, start)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


class Projections(nn.Module):
    """The attention layer around the kernel: q, k, v and output projections (GQA), rotary
    embedding on q and k. Shared by ``SparseKAttention`` and the dense baselines of ``models``.

    ``qkv(x)``: x [B, S, d_model] -> q [B, n_heads, S, hd], k, v [B, n_kv_heads, S, hd];
    ``merge(o)``: o [B, n_heads, S, hd] -> [B, S, d_model]."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 bias: bool = False, rope_base: float = 10000.0, name: str = "SparseKAttention"):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        head_dim = d_model // n_heads if head_dim is None else head_dim
        if n_heads % n_kv_heads:
            raise ValueError(f"{name}: n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if head_dim % 2:
            raise ValueError(f"{name}: head_dim must be even for the rotary embedding, got {head_dim}")
        self.n_heads, self.n_kv_heads, self.head_dim, self.rope_base = n_heads, n_kv_heads, head_dim, rope_base
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)
        self._name = name

    def qkv(self, x: Tensor, start: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``start``: position of x's first token ([1] int64 tensor; default 0)."""
        if x.dim() != 3:
            raise ValueError(f"{self._name}: x must be [batch, seq, d_model], got shape {tuple(x.shape)}")
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return rotary(q, self.rope_base, start), rotary(k, self.rope_base, start), v

    def merge(self, o: Tensor) -> Tensor:
        B, _, S, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class SparseKAttention(Projections):
    """SPARSEK attention layer with its scoring network.

    Args:
        d_model: width of the layer input and output.
        n_heads: query heads; n_kv_heads: key/value heads (divides n_heads; default n_heads).
        topk, window: pairs selected by score and the sliding window (DESIGN section 2).
        head_dim: per-head width (default d_model // n_heads; even, for the rotary embedding).
        backend: the op's backend ("auto": Triton on CUDA, PyTorch on CPU).
        slope_init: the position slope of a fresh scorer (> 0: it starts as a sliding window).
        keep_selection: keep the last call's scores (``last_scores``) for ``selection_mask``.

    ``forward(x)``: x [B, S, d_model] -> [B, S, d_model].

    Generation with a constant-size cache (``cache.py``): ``cache = layer.new_cache(B, ...)``,
    ``y = layer.prefill(x_prompt, cache)`` (the forward, and the cache built from the prompt),
    then ``y1 = layer.step(x1, cache)`` per token, x1 [B, 1, d_model]: the forward's output at
    that position, at a cost independent of the position.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, *, topk: int, window: int,
                 head_dim: int | None = None, bias: bool = False, rope_base: float = 10000.0,
                 backend: str = "auto", slope_init: float = SLOPE_INIT, keep_selection: bool = False):
        if topk < 0 or window < 0 or topk + window == 0:
            raise ValueError(f"SparseKAttention: need topk >= 0, window >= 0, not both 0; got topk={topk}, window={window}")
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, bias, rope_base)
        self.topk, self.window, self.backend = topk, window, backend
        self.score = nn.Linear(d_model, self.n_kv_heads)  # w_score, b_score
        self.slope = nn.Parameter(torch.full((self.n_kv_heads,), float(slope_init)))
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)
        self.keep_selection = keep_selection
        self.last_scores: Tensor | None = None

    def scores(self, x: Tensor, start: Tensor | None = None) -> Tensor:
        """u [B, n_kv_heads, S] float32 from x [B, S, d_model] (``start``: as in ``qkv``)."""
        pos = positions(x.shape[1], x.device, start)
        u = self.score(x).float() + self.slope.float()[None, None, :] * pos[None, :, None]
        return u.transpose(1, 2)

    def new_cache(self, batch: int, dtype: torch.dtype | None = None, device=None,
                  tail_capacity: int | None = None) -> SparseKCache:
        """An empty decode cache for ``batch`` sequences (dtype and device default to the
        layer's weights')."""
        w = self.k_proj.weight
        return SparseKCache(batch, self.n_kv_heads, self.head_dim, topk=self.topk, window=self.window,
                            dtype=dtype or w.dtype, device=device or w.device, tail_capacity=tail_capacity)

    def prefill(self, x: Tensor, cache: SparseKCache) -> Tensor:
        """The forward over a prompt x [B, P, d_model], and ``cache`` rebuilt from it."""
        return self.forward(x, cache)

    def step(self, x: Tensor, cache: SparseKCache) -> Tensor:
        """One new token x [B, 1, d_model] at the cache's position -> [B, 1, d_model]."""
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"SparseKAttention.step: x must be [batch, 1, d_model], got {tuple(x.shape)}")
        q, k, v = self.qkv(x, cache.pos)
        return self.merge(cache.decode(q, k, v, self.scores(x, cache.pos), backend=self.backend))

    def forward(self, x: Tensor, cache: SparseKCache | None = None) -> Tensor:
        """x [B, S, d_model] -> [B, S, d_model]; with ``cache``, also rebuild it from x (``prefill``)."""
        q, k, v = self.qkv(x)
        u = self.scores(x)
        if self.keep_selection:
            self.last_scores = u.detach()
        if cache is not None:
            cache.prefill(k, v, u)
        return self.merge(sparsek_attention(q, k, v, u, topk=self.topk, window=self.window, backend=self.backend))

    def selection_mask(self) -> Tensor:
        """[B, n_kv_heads, S, S] bool of the last call (needs ``keep_selection``): entry (i, j) is
        True when query i attends position j (its top-k by score or its window). For pictures
        and inspection; S x S memory."""
        if self.last_scores is None:
            raise RuntimeError("SparseKAttention.selection_mask: no scores kept; set keep_selection=True and call the layer")
        u = self.last_scores
        B, H, S = u.shape
        i = torch.arange(S, device=u.device)[:, None]
        j = torch.arange(S, device=u.device)[None, :]
        window = (j <= i) & (j > i - self.window)
        if self.topk == 0:
            return window.expand(B, H, S, S).clone()
        evict = selection.select(u, self.topk, self.window, fractional=False).evict.view(B, H, 1, S)
        return window | ((j + self.window <= i) & (i < evict))
