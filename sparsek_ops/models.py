"""A small GPT whose attention kind is a constructor argument (issue 5): ``"full"`` (dense causal,
SDPA), ``"window"`` (sliding window: the SPARSEK op with topk = 0) or ``"sparsek"`` (SPARSEK +
sliding window, ``nn.SparseKAttention``). Everything else is the same: pre-norm blocks,
rotary positions, GQA, a SwiGLU MLP, tied byte embeddings.

    model = GPT(GPTConfig(attention="sparsek", topk=64, window=64))
    logits = model(tokens)            # tokens [B, S] int64 -> [B, S, vocab]
    loss = model.loss(tokens)         # next-token cross-entropy
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .api import sparsek_attention
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


class DenseAttention(Projections):
    """Causal attention without selection: dense (``"full"``) or a sliding window of
    ``window`` positions (``"window"``, through the SPARSEK op with topk = 0, O(S * window)).
    Same projections and rotary embedding as ``SparseKAttention``, no scoring network."""

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, name="DenseAttention")
        self.cfg = cfg

    def forward(self, x: Tensor) -> Tensor:
        c = self.cfg
        q, k, v = self.qkv(x)
        if c.attention == "full":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.n_heads != c.n_kv_heads)
        else:
            u = torch.zeros(x.shape[0], c.n_kv_heads, x.shape[1], device=x.device)  # unused with topk = 0
            o = sparsek_attention(q, k, v, u, topk=0, window=c.window, backend=c.backend)
        return self.merge(o)


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
        x = x + self.attn(self.norm1(x))
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
