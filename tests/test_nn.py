"""SparseKAttention (sparsek_ops/nn.py) and the small GPT (sparsek_ops/models.py) on CPU."""

import pytest
import torch
import torch.nn.functional as F

from sparsek_ops.models import GPT, KINDS, GPTConfig
from sparsek_ops.nn import SparseKAttention, rotary


def layer(**kw):
    torch.manual_seed(0)
    args = dict(d_model=48, n_heads=6, n_kv_heads=2, topk=5, window=4)
    args.update(kw)
    return SparseKAttention(**args)


def test_shapes_dtypes_and_gradients_reach_the_scoring_network():
    m = layer()
    x = torch.randn(3, 37, 48, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # The scorer learns from the attention loss (fractional pairs exist from the first step).
    assert m.score.weight.grad.abs().sum() > 0 and m.slope.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("slope_init", [0.05, 0.25, 2.0])
def test_fresh_layer_is_a_sliding_window_of_topk_plus_window(slope_init):
    """Initialised scores rise with position: query i attends exactly i - topk - window + 1 .. i."""
    m = layer(topk=6, window=3, keep_selection=True, slope_init=slope_init)
    S = 50
    m(torch.randn(2, S, 48))
    mask = m.selection_mask()
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    band = (j <= i) & (j > i - 9)
    assert mask.shape == (2, 2, S, S) and torch.equal(mask, band.expand_as(mask))


def test_all_pairs_selected_is_causal_attention_with_the_same_projections():
    """topk >= S, window = 0: the layer is dense causal attention (DESIGN section 2), so the
    projections, rotary embedding and GQA layout are wired as SDPA expects them."""
    m = layer(topk=64, window=0).double()
    x = torch.randn(2, 30, 48, dtype=torch.float64)
    B, S, _ = x.shape
    q = rotary(m.q_proj(x).view(B, S, 6, 8).transpose(1, 2))
    k = rotary(m.k_proj(x).view(B, S, 2, 8).transpose(1, 2))
    v = m.v_proj(x).view(B, S, 2, 8).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    want = m.o_proj(o.transpose(1, 2).reshape(B, S, -1))
    torch.testing.assert_close(m(x), want)


def test_rotary_is_a_rotation_of_each_pair():
    x = torch.randn(1, 2, 9, 8, dtype=torch.float64)
    y = rotary(x)
    torch.testing.assert_close(y.view(1, 2, 9, 4, 2).norm(dim=-1), x.view(1, 2, 9, 4, 2).norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0 is not rotated


def test_compiled_equals_eager_without_graph_breaks():
    m = layer().double()
    x = torch.randn(2, 33, 48, dtype=torch.float64)
    explanation = torch._dynamo.explain(m)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x), m(x))
    g_eager = torch.autograd.grad(m(x).square().sum(), list(m.parameters()))
    g_comp = torch.autograd.grad(compiled(x).square().sum(), list(m.parameters()))
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_a_few_training_steps_lower_the_loss(kind):
    torch.manual_seed(0)
    model = GPT(GPTConfig(attention=kind, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, topk=8, window=8))
    tokens = torch.randint(0, 256, (4, 65))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model.loss(tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
    assert model(tokens).shape == (4, 65, 256)


def test_bad_arguments_name_what_is_wrong():
    with pytest.raises(ValueError, match="n_kv_heads"):
        SparseKAttention(48, 6, 4, topk=2, window=2)
    with pytest.raises(ValueError, match="topk"):
        SparseKAttention(48, 6, 2, topk=0, window=0)
    with pytest.raises(ValueError, match=r"\[batch, seq, d_model\]"):
        layer()(torch.randn(37, 48))
    with pytest.raises(RuntimeError, match="keep_selection"):
        layer().selection_mask()
    with pytest.raises(ValueError, match="attention must be one of"):
        GPT(GPTConfig(attention="dense"))
    with pytest.raises(ValueError, match="int64"):
        GPT(GPTConfig(d_model=32, n_heads=4))(torch.zeros(2, 5, dtype=torch.int32))
