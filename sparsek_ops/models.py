"""A small GPT whose attention kind is a constructor argument (issue 5): ``"full"`` (dense causal,
SDPA), ``"window"`` (sliding window: the SPARSEK op with topk = 0) or ``"sparsek"`` (SPARSEK +
sliding window, ``nn.SparseKAttention``). Everything else is the same: pre-norm blocks,
rotary positions, GQA, a SwiGLU MLP, tied byte embeddings.

    model = GPT(GPTConfig(attention="sparsek", topk=64, window=64))
    logits = model(tokens)            # tokens [B, S] int64 -> [B, S, vocab]
    loss = model.loss(tokens)         # next-token cross-entropy
    out = model.generate(prompt, 200, temperature=0.8, top_k=40)   # prompt [B, P] -> [B, P + 200]

Generation keeps one cache per layer: ``"sparsek"`` and ``"window"`` the constant-size SPARSEK
cache (``cache.SparseKCache``; the window kind is the op with topk = 0), ``"full"`` a dense cache
of every position (``DenseKVCache``), the baseline whose memory grows with the context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .api import sparsek_attention
from .cache import SparseKCache, StateTensors
from .nn import SLOPE_INIT, Projections, SparseKAttention

KINDS = ("full", "window", "sparsek")


@dataclass
class GPTConfig:
    vocab: int = 256  # bytes
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    attention: str = "sparsek"  # full | window | sparsek
    topk: int = 64  # sparsek: pairs selected by score
    window: int = 64  # window and sparsek: sliding window
    slope_init: float = SLOPE_INIT  # sparsek: the scorer's initial position slope
    mlp_mult: float = 8 / 3
    backend: str = "auto"


class DenseKVCache(StateTensors):
    """Every position's keys and values, for dense causal decoding (the ``"full"`` baseline):
    k [B, H, max_len, D], v [B, H, max_len, D], pos [1] int64 (the next position)."""

    TENSORS = ("k", "v", "pos")

    def __init__(self, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype, device=None):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)
        self.max_len = max_len

    def prefill(self, k: Tensor, v: Tensor) -> None:
        P = k.shape[2]
        if P > self.max_len:
            raise ValueError(f"DenseKVCache: a prompt of {P} tokens does not fit max_len = {self.max_len}")
        self.k[:, :, :P], self.v[:, :, :P] = k, v
        self.pos.fill_(P)

    def decode(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [B, Hq, 1, D], k, v [B, H, 1, D] at position pos -> [B, Hq, 1, D]. No check that pos <
        max_len (that would be a host sync): ``GPT.generate`` sizes the cache."""
        self.k.index_copy_(2, self.pos, k)
        self.v.index_copy_(2, self.pos, v)
        seen = (torch.arange(self.max_len, device=q.device) <= self.pos)[None]  # [1, max_len]
        o = F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=seen,
                                           enable_gqa=q.shape[1] != k.shape[1])
        self.pos.add_(1)
        return o


class DenseAttention(Projections):
    """Causal attention without selection: dense (``"full"``) or a sliding window of
    ``window`` positions (``"window"``, through the SPARSEK op with topk = 0, O(S * window)).
    Same projections and rotary embedding as ``SparseKAttention``, no scoring network."""

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, name="DenseAttention")
        self.cfg = cfg

    def forward(self, x: Tensor, cache=None) -> Tensor:
        """x [B, S, d_model] -> [B, S, d_model]; with ``cache``, also rebuild it from x (``prefill``)."""
        c = self.cfg
        q, k, v = self.qkv(x)
        if c.attention == "full":
            if cache is not None:
                cache.prefill(k, v)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.n_heads != c.n_kv_heads)
        else:
            u = self._no_scores(k)
            if cache is not None:
                cache.prefill(k, v, u)
            o = sparsek_attention(q, k, v, u, topk=0, window=c.window, backend=c.backend)
        return self.merge(o)

    @staticmethod
    def _no_scores(k: Tensor) -> Tensor:
        """Scores for the window kind (the op with topk = 0 never reads them): zeros [B, H, S]."""
        return torch.zeros(k.shape[:3], device=k.device)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None):
        w = self.k_proj.weight
        dtype, device = dtype or w.dtype, device or w.device
        if self.cfg.attention == "full":
            return DenseKVCache(batch, self.n_kv_heads, self.head_dim, max_len, dtype, device)
        return SparseKCache(batch, self.n_kv_heads, self.head_dim, topk=0, window=self.cfg.window,
                            dtype=dtype, device=device)

    def prefill(self, x: Tensor, cache) -> Tensor:
        return self.forward(x, cache)

    def step(self, x: Tensor, cache) -> Tensor:
        q, k, v = self.qkv(x, cache.pos)
        if self.cfg.attention == "full":
            return self.merge(cache.decode(q, k, v))
        return self.merge(cache.decode(q, k, v, self._no_scores(k), backend=self.cfg.backend))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.norm2 = nn.RMSNorm(cfg.d_model)
        if cfg.attention == "sparsek":
            self.attn = SparseKAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, topk=cfg.topk,
                                         window=cfg.window, backend=cfg.backend, slope_init=cfg.slope_init)
        else:
            self.attn = DenseAttention(cfg)
        hidden = int(cfg.mlp_mult * cfg.d_model)
        self.gate_up = nn.Linear(cfg.d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x + self.attn(self.norm1(x)))

    def mlp(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(self.norm2(x)).chunk(2, -1)
        return x + self.down(F.silu(gate) * up)


class GPT(nn.Module):
    """tokens [B, S] int64 -> logits [B, S, vocab]."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.attention not in KINDS:
            raise ValueError(f"GPT: attention must be one of {KINDS}, got {cfg.attention!r}")
        if cfg.d_model % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
            raise ValueError(f"GPT: need d_model % n_heads == 0 and n_heads % n_kv_heads == 0, got "
                             f"d_model={cfg.d_model}, n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2 or tokens.dtype != torch.int64:
            raise ValueError(f"GPT: tokens must be [batch, seq] int64, got shape {tuple(tokens.shape)} {tokens.dtype}")
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.t()  # tied output embedding

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean next-token cross-entropy over tokens [B, S] (predicts tokens[:, 1:])."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))

    # -- generation -------------------------------------------------------------------------
    def new_caches(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> list:
        """One empty cache per layer. ``max_len`` (prompt + new tokens) sizes only the ``"full"``
        kind's dense cache; the SPARSEK and window caches have a fixed size whatever the length."""
        kw = dict(dtype=dtype, device=device)
        if self.cfg.attention == "sparsek":
            return [b.attn.new_cache(batch, **kw) for b in self.blocks]
        return [b.attn.new_cache(batch, max_len, **kw) for b in self.blocks]

    def prefill(self, tokens: Tensor, caches: list) -> Tensor:
        """The forward over a prompt tokens [B, P] (parallel), filling ``caches``; -> logits [B, P, vocab]."""
        x = self.embed(tokens)
        for block, cache in zip(self.blocks, caches):
            x = block.mlp(x + block.attn.prefill(block.norm1(x), cache))
        return self.norm(x) @ self.embed.weight.t()

    def step(self, token: Tensor, caches: list) -> Tensor:
        """One token per sequence, token [B] int64, at the caches' position -> logits [B, vocab].
        Every layer's cost is independent of the position (``"full"`` aside)."""
        x = self.embed(token[:, None])
        for block, cache in zip(self.blocks, caches):
            x = block.mlp(x + block.attn.step(block.norm1(x), cache))
        return (self.norm(x) @ self.embed.weight.t())[:, 0]

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None,
                 progress: bool | None = None, compile: bool = False) -> Tensor:
        """Sample ``max_new_tokens`` after prompt [B, P] int64 (P >= 1) -> [B, P + max_new_tokens].

        The prompt goes through the parallel forward once (prefill), then one ``step`` per token
        against the per-layer caches. Sampling: ``temperature`` (0: greedy), ``top_k`` (keep the k
        likeliest tokens), ``top_p`` (keep the smallest set whose probability reaches p), seeded by
        ``generator``. ``progress``: a progress bar (default: for 256 tokens or more).
        ``compile``: run the step through ``torch.compile(fullgraph=True)``, with CUDA graphs
        (``mode="reduce-overhead"``) on CUDA.
        """
        if prompt.dim() != 2 or prompt.dtype != torch.int64 or prompt.shape[1] == 0:
            raise ValueError(f"GPT.generate: prompt must be [batch, seq] int64 with seq >= 1, got shape "
                             f"{tuple(prompt.shape)} {prompt.dtype}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"GPT.generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"GPT.generate: temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"GPT.generate: top_k must be None or an int >= 1, got {top_k!r}")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"GPT.generate: top_p must be None or in (0, 1], got {top_p!r}")
        B, P = prompt.shape
        caches = self.new_caches(B, P + max_new_tokens, device=prompt.device)
        logits = self.prefill(prompt, caches)[:, -1]
        step = self.step
        if compile:
            for c in caches:
                c.mark_static()
            mode = "reduce-overhead" if prompt.is_cuda else None
            step = torch.compile(self.step, fullgraph=True, mode=mode)
        out = [prompt]
        show = max_new_tokens >= 256 if progress is None else progress
        from tqdm.auto import tqdm
        for _ in tqdm(range(max_new_tokens), desc="generate", unit="tok", disable=not show):
            token = sample(logits, temperature, top_k, top_p, generator)
            out.append(token[:, None])
            if len(out) == max_new_tokens + 1:
                break  # the last token needs no step
            logits = step(token, caches).clone()  # clone: a CUDA-graph output is overwritten by the next replay
        return torch.cat(out, 1)


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """One token per row of logits [B, vocab] -> [B] int64 (see ``GPT.generate``)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        srt, idx = logits.sort(-1, descending=True)
        probs = srt.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the tokens after the set reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
