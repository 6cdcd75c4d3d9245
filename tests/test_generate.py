"""Generation with the small GPT (issue 6): prefill, per-token steps against per-layer caches,
sampling options, a progress bar, compiled steps (CUDA graphs on the GPU)."""

import pytest
import torch

from sparsek_ops.models import GPT, GPTConfig, KINDS, sample


def model(kind: str, n_layers: int = 2, **kw) -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(attention=kind, d_model=64, n_layers=n_layers, topk=8, window=6, **kw)).eval()
    if kind == "sparsek":  # a scorer that is not just recency, so selection and eviction happen
        for b in m.blocks:
            torch.nn.init.normal_(b.attn.score.weight, std=0.5)
    return m


def greedy_by_recompute(m: GPT, prompt: torch.Tensor, n: int) -> torch.Tensor:
    x = prompt
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, m(x)[:, -1].argmax(-1, keepdim=True)], 1)
    return x


@pytest.mark.parametrize("kind", KINDS)
def test_steps_give_the_forward_logits(kind):
    """Prefill 15 tokens, then step through 25 more: the logits of every position equal the
    parallel forward's."""
    m = model(kind)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(tokens)
        caches = m.new_caches(2, 40)
        got = [m.prefill(tokens[:, :15], caches)]
        got += [m.step(tokens[:, i], caches)[:, None] for i in range(15, 40)]
    torch.testing.assert_close(torch.cat(got, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_equals_recomputing_the_forward(kind):
    m = model(kind)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    out = m.generate(prompt, 30, temperature=0)
    assert out.shape == (2, 35) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, greedy_by_recompute(m, prompt, 30))


def test_sampling_options():
    m = model("sparsek")
    prompt = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(3))
    greedy = m.generate(prompt, 12, temperature=0)
    assert torch.equal(m.generate(prompt, 12, top_k=1), greedy)
    assert torch.equal(m.generate(prompt, 12, top_p=1e-6), greedy)
    a = m.generate(prompt, 12, temperature=1.5, generator=torch.Generator().manual_seed(7))
    b = m.generate(prompt, 12, temperature=1.5, generator=torch.Generator().manual_seed(7))
    c = m.generate(prompt, 12, temperature=1.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert m.generate(prompt, 0).shape == (3, 4)


def test_sample_keeps_only_the_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, top_p=0.79, generator=g).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.79
    assert set(sample(logits, top_p=0.81, generator=g).tolist()) == {0, 1, 2}
    freq = torch.bincount(sample(logits, generator=g), minlength=4) / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    assert torch.equal(sample(logits[:2], temperature=0), torch.zeros(2, dtype=torch.long))


def test_progress_bar(capsys):
    m = model("window", n_layers=1)
    m.generate(torch.zeros(1, 3, dtype=torch.long), 5, progress=True)
    assert "generate" in capsys.readouterr().err
    m.generate(torch.zeros(1, 3, dtype=torch.long), 5)  # short runs: no bar by default
    assert "generate" not in capsys.readouterr().err


def test_generate_rejects_bad_arguments():
    m = model("window", n_layers=1)
    p = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"prompt must be \[batch, seq\] int64 with seq >= 1, got shape \(1, 0\)"):
        m.generate(torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got -1"):
        m.generate(p, -1)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        m.generate(p, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k must be None or an int >= 1, got 0"):
        m.generate(p, 2, top_k=0)
    with pytest.raises(ValueError, match=r"top_p must be None or in \(0, 1\], got 1.5"):
        m.generate(p, 2, top_p=1.5)


def test_compiled_generate_equals_eager():
    """``compile=True``: the step through ``torch.compile(fullgraph=True)`` (no graph break), the
    same tokens as eager."""
    m = model("sparsek", n_layers=1)
    prompt = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    assert torch.equal(m.generate(prompt, 16, temperature=0, compile=True), m.generate(prompt, 16, temperature=0))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_graph_generate_equals_eager(kind):
    """On CUDA, ``compile=True`` runs the step as a CUDA graph (``mode="reduce-overhead"``; the
    caches are static and updated in place by the graph) and gives eager's tokens."""
    from torch._dynamo.utils import counters
    m = model(kind, n_layers=2).cuda()
    prompt = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(5)).cuda()
    eager = m.generate(prompt, 48, temperature=0)
    torch._dynamo.reset()
    counters.clear()
    graphed = m.generate(prompt, 48, temperature=0, compile=True)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert torch.equal(graphed, eager)
    graphs = counters["stats"]["unique_graphs"]
    other = prompt.flip(1)
    again = m.generate(other, 48, temperature=0, compile=True)  # new caches (same shapes), another prompt
    assert counters["stats"]["unique_graphs"] == graphs, "a second generate() compiled the step again"
    assert torch.equal(again, m.generate(other, 48, temperature=0))
    assert torch.equal(eager.cpu(), greedy_by_recompute(m.cpu(), prompt.cpu(), 48))
