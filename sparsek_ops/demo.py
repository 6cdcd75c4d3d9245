"""The main job: does SPARSEK attention learn? Train a small byte-level GPT three ways -- full
causal attention, sliding-window attention, SPARSEK + sliding window -- on the same corpus
(the Python standard library of the interpreter that runs this), at the same size, and compare.
Then a long-range check: key-value recall whose answers sit beyond the window, some of them
also beyond ``topk + window`` (out of reach of a fresh SPARSEK layer's recency selection).

    python -m sparsek_ops.demo [--steps 140] [--seq 512] [--topk 64] [--window 64]
                               [--recall-steps 100] [--device cpu|cuda] [--out sparsek_demo_out]

Writes to --out: results.json (every number and the settings), loss_curves.png, selection.png
(what a trained SPARSEK layer attends: queries x positions), and prints a table. Each kind
trains in its own process, so that its peak memory is its own. About 9 minutes on 2 CPU cores
with the defaults (2 minutes on an H100, where the op runs the Triton kernels).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from . import reference
from .api import sparsek_attention
from .models import KINDS, GPT, GPTConfig
from .nn import SLOPE_INIT

RECALL_PAIRS = 4  # pairs per recall sequence (each asked once)
RECALL_EVAL = 128  # held-out recall sequences


# ------------------------------------------------------------------ data
def stdlib_corpus(max_bytes: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Byte tokens of the standard library's .py files, train and validation split by file
    (crc32 of the relative path: about 1 file in 10 is validation), files in sorted order, each
    split filled up to its share of max_bytes (90% / 10%). Deterministic for a given Python
    installation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    budget = {"train": 0.9 * max_bytes, "val": 0.1 * max_bytes}
    parts = {"train": [], "val": []}
    for p in files:
        split = "val" if zlib.crc32(str(p.relative_to(root)).encode()) % 10 == 0 else "train"
        data = p.read_bytes()
        if 0 < len(data) <= budget[split]:
            parts[split].append(data)
            budget[split] -= len(data) + 2
    if not parts["train"] or not parts["val"]:
        raise RuntimeError(f"too little Python source under {root} for a train/validation split of "
                           f"{max_bytes} bytes; raise --corpus-mb")
    tok = {s: torch.frombuffer(bytearray(b"\n\n".join(d)), dtype=torch.uint8).long() for s, d in parts.items()}
    info = {"root": str(root), "files_train": len(parts["train"]), "files_val": len(parts["val"]),
            "bytes_train": tok["train"].numel(), "bytes_val": tok["val"].numel()}
    return tok["train"], tok["val"], info


def crops(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, seq + 1] random windows of data."""
    start = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
    return torch.stack([data[s:s + seq + 1] for s in start.tolist()])


def recall_batch(batch: int, gen: torch.Generator, pairs: int, lead: int, spacing: int):
    """Key-value recall. Each sequence: ``pairs`` pairs "Kv " (distinct capital keys, small-letter
    values), ``lead`` filler digits, then every pair asked once in random order, each question
    "?K" answered by its v and preceded by ``spacing`` more digits. Questions sit at growing
    distances from their pairs, so one sequence holds near and far answers.

    Returns tokens [batch, L] int64, where [batch, pairs] (the position of each answer) and
    distance [batch, pairs] (answer position minus the position of the pair's value)."""
    rows, where, dist = [], [], []
    for _ in range(batch):
        keys = torch.randperm(26, generator=gen)[:pairs].tolist()
        vals = torch.randint(0, 26, (pairs,), generator=gen).tolist()
        seq = []
        for kk, vv in zip(keys, vals):
            seq += [65 + kk, 97 + vv, 32]
        pos, d = [], []
        for n, a in enumerate(torch.randperm(pairs, generator=gen).tolist()):
            seq += (48 + torch.randint(0, 10, (lead if n == 0 else spacing,), generator=gen)).tolist()
            seq += [63, 65 + keys[a]]
            pos.append(len(seq))
            d.append(len(seq) - (3 * a + 1))
            seq.append(97 + vals[a])
        rows.append(seq)
        where.append(pos)
        dist.append(d)
    return torch.tensor(rows), torch.tensor(where), torch.tensor(dist)


def recall_shape(args) -> dict:
    """The recall sequences for a window and topk: the first question more than ``window``
    positions after its pair (out of a sliding window's sight), the last about ``window +
    2 * topk`` after, so that answers lie both within ``topk + window`` (where a fresh SPARSEK
    layer's recency selection still reaches) and beyond it (where the scorer must have learned
    to keep the pair)."""
    return {"pairs": RECALL_PAIRS, "lead": args.window + 8, "spacing": max(8, args.topk // 2)}


# ------------------------------------------------------------------ measuring
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory of what runs inside, in MiB: CUDA's max allocated on a GPU, else the growth of
    the process's peak resident set (Linux: VmHWM, reset through /proc/self/clear_refs)."""

    def __init__(self, device: torch.device):
        self.device, self.mib = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif os.path.exists("/proc/self/clear_refs"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif os.path.exists("/proc/self/clear_refs"):
            self.mib = (_rss_kib("VmHWM") * 1024 - self.base) / 2**20


def check_op(device: torch.device) -> float:
    """Largest error of the op's output and gradients against the float64 reference, small problem."""
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(*s, generator=g, dtype=torch.float64) for s in
              ((2, 4, 96, 32), (2, 2, 96, 32), (2, 2, 96, 16), (2, 2, 96))]
    mine = [x.to(device).requires_grad_() for x in leaves]
    out = sparsek_attention(*mine, topk=8, window=8)
    grads = torch.autograd.grad(out.square().sum(), mine)
    ref_leaves = [x.clone().requires_grad_() for x in leaves]
    ref, _ = reference.attention(*ref_leaves, 8, 8)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    return max((a.cpu() - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads)))


# ------------------------------------------------------------------ training
def make_model(kind: str, args, layers: int | None = None) -> GPT:
    torch.manual_seed(args.seed)  # same initial weights for the parts every kind shares
    cfg = GPTConfig(attention=kind, d_model=args.d_model, n_layers=layers or args.layers, n_heads=args.heads,
                    n_kv_heads=args.kv_heads, topk=args.topk, window=args.window, slope_init=args.slope_init)
    return GPT(cfg).to(args.device)


def lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def update(model: GPT, opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> None:
    """One optimiser step at learning rate lr, gradients clipped to norm 1."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def answer_logits(model: GPT, tokens: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """[B, Q, vocab]: the model's prediction of each answer token ``tokens[b, where[b, q]]``."""
    logits = model(tokens[:, :-1])
    return logits.gather(1, (where - 1)[:, :, None].expand(-1, -1, logits.shape[-1]))


def train_lm(kind: str, args, train: torch.Tensor, val_batches: list[torch.Tensor]) -> tuple[GPT, dict]:
    model = make_model(kind, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same batches for every kind
    curve = {"step": [], "train": [], "val_step": [], "val": []}
    busy = 0.0
    dev = torch.device(args.device)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            losses = [model.loss(b.to(dev)).item() for b in val_batches]
        model.train()
        return sum(losses) / len(losses)

    with PeakMemory(dev) as mem:
        for step in tqdm(range(args.steps), desc=f"train {kind:8s}", unit="step", leave=False):
            tokens = crops(train, args.batch, args.seq, gen).to(dev)
            t0 = time.perf_counter()
            loss = model.loss(tokens)
            update(model, opt, loss, lr_at(step, args.steps, args.lr))
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            busy += time.perf_counter() - t0
            curve["step"].append(step + 1)
            curve["train"].append(loss.item())
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                curve["val_step"].append(step + 1)
                curve["val"].append(evaluate())
    val = curve["val"][-1]
    return model, {"kind": kind, "params": sum(p.numel() for p in model.parameters()), "val_loss": val,
                   "val_ppl": math.exp(val), "tokens_per_s": args.steps * args.batch * args.seq / busy,
                   "peak_mib": mem.mib, "train_s": busy, "curve": curve}


def train_recall(kind: str, args) -> dict:
    """Train a fresh ``args.recall_layers``-layer model of the same kind on the recall task (loss
    on the answers only); its accuracy on held-out sequences, overall and split at distance
    ``topk + window``."""
    shape = recall_shape(args)
    model = make_model(kind, args, layers=args.recall_layers)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 2)
    dev = torch.device(args.device)
    t0 = time.perf_counter()
    for step in tqdm(range(args.recall_steps), desc=f"recall {kind:7s}", unit="step", leave=False):
        tokens, where, _ = recall_batch(args.recall_batch, gen, **shape)
        tokens, where = tokens.to(dev), where.to(dev)
        pred = answer_logits(model, tokens, where)
        loss = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(),
                                                 tokens.gather(1, where).reshape(-1))
        update(model, opt, loss, lr_at(step, args.recall_steps, args.lr))
    train_s = time.perf_counter() - t0
    tokens, where, dist = recall_batch(RECALL_EVAL, torch.Generator().manual_seed(args.seed + 3), **shape)
    model.eval()
    with torch.no_grad():
        guess = answer_logits(model, tokens.to(dev), where.to(dev)).argmax(-1).cpu()
    right = guess == tokens.gather(1, where)
    reach = args.topk + args.window
    near, far = dist <= reach, dist > reach
    acc = lambda m: right[m].float().mean().item() if m.any() else float("nan")  # noqa: E731
    return {"kind": kind, "accuracy": acc(torch.ones_like(right)), "accuracy_near": acc(near),
            "accuracy_far": acc(far), "reach": reach, "chance": 1 / 26,
            "distance_min": int(dist.min()), "distance_max": int(dist.max()), "answers": right.numel(),
            "answers_near": int(near.sum()), "steps": args.recall_steps, "batch": args.recall_batch,
            "layers": args.recall_layers, "seq": tokens.shape[1], "train_s": train_s, **shape}


# ------------------------------------------------------------------ output
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_plot(out: Path, runs: list[dict], args) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        c = r["curve"]
        k = max(1, len(c["train"]) // 50)
        smooth = [sum(c["train"][max(0, i - k + 1):i + 1]) / len(c["train"][max(0, i - k + 1):i + 1])
                  for i in range(len(c["train"]))]
        line, = ax.plot(c["step"], smooth, alpha=0.6, label=f"{r['kind']} train")
        ax.plot(c["val_step"], c["val"], "o-", color=line.get_color(), label=f"{r['kind']} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_title(f"byte-level GPT on the Python stdlib, S={args.seq}, topk={args.topk}, window={args.window}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)
    return "loss_curves.png"


def selection_picture(out: Path, model: GPT, val: torch.Tensor, args) -> str:
    """What the last layer of a trained SPARSEK model attends on a validation sample: queries x
    positions for KV head 0 (the top-k by score and the window)."""
    attn = model.blocks[-1].attn
    attn.keep_selection = True
    with torch.no_grad():
        model(val[: args.seq][None].to(args.device))
    mask = attn.selection_mask()[0, 0].cpu().float()
    attn.keep_selection, attn.last_scores = False, None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(mask, cmap="Greys", interpolation="nearest")
    ax.set_xlabel("position j")
    ax.set_ylabel("query i")
    ax.set_title(f"trained SPARSEK layer {len(model.blocks) - 1}, KV head 0:\n"
                 f"selected (top-{args.topk}) and window ({args.window}) positions", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "selection.png", dpi=120)
    plt.close(fig)
    return "selection.png"


def table(runs: list[dict], recall: list[dict]) -> str:
    lines = ["| attention | parameters | validation loss | perplexity | tokens/s | peak memory (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['kind']} | {r['params']:,} | {r['val_loss']:.4f} | {r['val_ppl']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['peak_mib']:.0f} |")
    if recall:
        r0 = recall[0]
        lines += ["", f"| attention | recall accuracy | answer {r0['distance_min']}-{r0['reach']} back | "
                      f"answer {r0['reach'] + 1}-{r0['distance_max']} back | chance |", "|---|---|---|---|---|"]
        for r in recall:
            lines.append(f"| {r['kind']} | {r['accuracy']:.3f} | {r['accuracy_near']:.3f} | "
                         f"{r['accuracy_far']:.3f} | {r['chance']:.3f} |")
    return "\n".join(lines)


def sample_text(model: GPT, val: torch.Tensor, args) -> dict:
    """Generate ``args.sample_bytes`` bytes after a validation prompt (``GPT.generate``: prefill,
    then one cached step per byte; temperature 0.8, top-k 40, seeded): the text, the decoding
    speed and the cache bytes, which stay constant for SPARSEK and the window and grow with the
    length for full attention."""
    dev = torch.device(args.device)
    prompt = val[: args.sample_prompt][None].to(dev)
    n = args.sample_bytes
    model.eval()
    t0 = time.perf_counter()
    out = model.generate(prompt, n, temperature=0.8, top_k=40, generator=torch.Generator(dev).manual_seed(args.seed))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t0
    cache_bytes = sum(c.nbytes() for c in model.new_caches(1, prompt.shape[1] + n, device=dev))
    def text(ids: torch.Tensor) -> str:
        return bytes(ids.tolist()).decode("utf-8", errors="replace")

    return {"prompt": text(out[0, : prompt.shape[1]]), "text": text(out[0, prompt.shape[1]:]), "bytes": n,
            "tokens_per_s": n / dt, "cache_bytes": cache_bytes}


def worker(kind: str, args, out: Path) -> None:
    """One attention kind in its own process (so that its peak memory is its own): the language
    model, the recall check, and for SPARSEK the selection picture; writes out/run_<kind>.json."""
    train, val, _ = stdlib_corpus(int(args.corpus_mb * 2**20))
    gen = torch.Generator().manual_seed(args.seed + 4)
    val_batches = [crops(val, args.batch, args.seq, gen) for _ in range(args.eval_batches)]
    model, run = train_lm(kind, args, train, val_batches)
    if kind == "sparsek":
        run["picture"] = selection_picture(out, model, val, args)
    if args.sample_bytes > 0:
        run["sample"] = sample_text(model, val, args)
    run["recall"] = train_recall(kind, args) if args.recall_steps > 0 else None
    with open(out / f"run_{kind}.json", "w") as f:
        json.dump(run, f)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=140, help="training steps per attention kind")
    ap.add_argument("--seq", type=int, default=512, help="training sequence length (bytes)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--d-model", dest="d_model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", dest="kv_heads", type=int, default=2)
    ap.add_argument("--slope-init", dest="slope_init", type=float, default=SLOPE_INIT,
                    help="the SPARSEK scorer's initial position slope")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", dest="eval_every", type=int, default=40)
    ap.add_argument("--eval-batches", dest="eval_batches", type=int, default=8)
    ap.add_argument("--recall-steps", dest="recall_steps", type=int, default=100,
                    help="training steps of the recall check per kind (0: skip it)")
    ap.add_argument("--recall-batch", dest="recall_batch", type=int, default=32)
    ap.add_argument("--recall-layers", dest="recall_layers", type=int, default=2,
                    help="layers of the recall check's models (2 suffice for recall)")
    ap.add_argument("--sample-bytes", dest="sample_bytes", type=int, default=300,
                    help="bytes each trained model generates after a validation prompt (0: none)")
    ap.add_argument("--sample-prompt", dest="sample_prompt", type=int, default=120,
                    help="prompt length of the generated sample (bytes)")
    ap.add_argument("--corpus-mb", dest="corpus_mb", type=float, default=8.0)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of full,window,sparsek")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="sparsek_demo_out", help="folder for results.json and the plots")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one kind per process
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or any(k not in KINDS for k in kinds):
        ap.error(f"--kinds must name some of {KINDS}, got {args.kinds!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args.worker, args, out)
        return {}
    t_start = time.perf_counter()
    err = check_op(torch.device(args.device))
    print(f"op check against the float64 reference: max abs error {err:.1e}")
    _, val, corpus = stdlib_corpus(int(args.corpus_mb * 2**20))
    print(f"corpus: {corpus['files_train']} + {corpus['files_val']} files of {corpus['root']}, "
          f"{corpus['bytes_train']:,} train / {corpus['bytes_val']:,} validation bytes")
    runs = []
    for kind in tqdm(kinds, desc="attention kinds", unit="kind"):
        subprocess.run([sys.executable, "-m", "sparsek_ops.demo", *argv, "--worker", kind], check=True)
        with open(out / f"run_{kind}.json") as f:
            runs.append(json.load(f))
        os.remove(out / f"run_{kind}.json")
    recall = [r.pop("recall") for r in runs if r.get("recall")]
    files = [loss_plot(out, runs, args)] + [r.pop("picture") for r in runs if "picture" in r]
    result = {"settings": vars(args), "corpus": corpus, "op_check_max_abs_error": err, "runs": runs,
              "recall": recall, "wall_s": time.perf_counter() - t_start,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "files": files + ["results.json"]}
    del result["settings"]["worker"]
    with open(out / "results.json", "w") as f:
        json.dump(result, f, indent=1)
    print()
    print(table(runs, recall))
    for r in runs:
        if r.get("sample"):
            smp = r["sample"]
            print(f"\n{r['kind']}: {smp['bytes']} bytes generated at {smp['tokens_per_s']:,.0f} bytes/s, "
                  f"cache {smp['cache_bytes'] / 1024:,.0f} KiB; after the prompt {smp['prompt']!r}:\n{smp['text']!r}")
    print(f"\n{args.steps} steps x {args.batch} x {args.seq} bytes per kind on {args.device}; "
          f"wall {result['wall_s']:.0f} s; wrote {', '.join(str(out / f) for f in result['files'])}")
    return result


if __name__ == "__main__":
    main()
