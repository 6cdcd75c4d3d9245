"""GPU report (DESIGN.md section 6; bench/gpu_run.sh runs it on the lent machine).

Standard workload: bf16, Hq = 16, D = 128, B * S = 32K tokens (B = 1 beyond), (topk, window)
pairs, Hkv = 16 and 2. Side by side in one run, forward, backward and forward+backward:

* SPARSEK (backend "triton", selection included), and the selection alone as the forward
  calls it;
* SDPA causal (dense);
* FlexAttention with a sliding window of the same keys per query (topk + window);
* FlexAttention with a block-sparse top-k BlockMask: each block of 128 queries attends its own
  block (causal) and the (topk + window) / 128 - 1 earlier blocks of highest (random) block
  score, the same keys per query, one mask for all heads.

Backward = forward+backward - forward. TFLOP/s count 4 * S * (topk + window) * D * Hq * B per
forward and 3.5 times that for forward+backward (SDPA: its causal work, 2 * S^2 * D * Hq * B
forward). Times are medians of ``triton.testing.do_bench``. SPARSEK is first checked against
SDPA at topk >= S (where it is causal attention).

    python3 bench/gpu_bench.py [--seqs 4096 ... 131072] [--pairs 1024:1024] [--kv 16 2] [--out DIR]

Writes to --out: gpu_bench.json (every number), gpu_bench.md (the table, with date, GPU and
command) and gpu_bench.png (time, speed-up over SDPA and TFLOP/s against S).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import sparsek_ops
from sparsek_ops.kernels import selection as gpu_selection
from sparsek_ops.kernels.forward import block_queries

METHODS = ("sparsek", "sdpa", "flex_window", "flex_topk")
LABELS = {"sparsek": "SPARSEK", "sdpa": "SDPA causal", "flex_window": "Flex window", "flex_topk": "Flex top-k blocks"}
FLEX_BLOCK = 128


def _flex():
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    return BlockMask, create_block_mask, torch.compile(flex_attention)


def _allow_recompiles(n: int = 256) -> None:
    """Every (S, Hkv, mask, grad mode) compiles flex_attention anew; past dynamo's recompile limit
    (8) it would silently run Flex's dense eager fallback (S x S scores: out of memory at 64K)."""
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(n, getattr(torch._dynamo.config, name)))


def flex_window_mask(S, keys, device):
    _, create_block_mask, _ = _flex()

    def mask_mod(b, h, qi, kv):
        return (kv <= qi) & (qi - kv < keys)

    try:  # _compile builds the mask block by block: no S x S tensor (128 GiB at 128K)
        return create_block_mask(mask_mod, None, None, S, S, device=device, _compile=True)
    except TypeError:
        return create_block_mask(mask_mod, None, None, S, S, device=device)


def flex_topk_mask(S, keys, device, seed=0):
    """Block-sparse top-k: query block i attends block i (causal mask) and the keys // 128 - 1
    earlier blocks of highest random score (all earlier blocks while there are fewer)."""
    BlockMask, _, _ = _flex()
    nb = -(-S // FLEX_BLOCK)
    extra = max(0, keys // FLEX_BLOCK - 1)
    g = torch.Generator(device=device).manual_seed(seed)
    i = torch.arange(nb, device=device)
    score = torch.rand(nb, nb, device=device, generator=g).masked_fill(i[None, :] >= i[:, None], -1.0)
    n_full = i.clamp(max=extra).to(torch.int32)  # earlier blocks chosen by row i
    top = score.topk(min(extra, nb), -1).indices  # row i: its n_full[i] earlier blocks come first
    top = torch.where(torch.arange(top.shape[1], device=device)[None] < n_full[:, None], top, nb).sort(-1).values
    full_idx = torch.zeros(nb, nb, dtype=torch.int32, device=device)
    full_idx[:, : top.shape[1]] = torch.where(top < nb, top, 0).to(torch.int32)
    part_n = torch.ones(nb, dtype=torch.int32, device=device)
    part_idx = torch.zeros(nb, nb, dtype=torch.int32, device=device)
    part_idx[:, 0] = i.to(torch.int32)

    def causal(b, h, qi, kv):
        return kv <= qi

    return BlockMask.from_kv_blocks(part_n[None, None], part_idx[None, None], n_full[None, None], full_idx[None, None],
                                    FLEX_BLOCK, causal, seq_lengths=(S, S))


def check(device):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 4, 512, 64, device=device, generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 512, 64, device=device, generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, 2, 512, 64, device=device, generator=g, dtype=torch.bfloat16)
    u = torch.randn(1, 2, 512, device=device, generator=g)
    out = sparsek_ops.sparsek_attention(q, k, v, u, topk=512, window=0, backend="triton")
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    if not err < 1e-2:
        raise SystemExit(f"SPARSEK (triton) at topk >= S differs from causal SDPA: rel. error {err:.3g}")
    return err


def measure(S, B, Hkv, topk, window, Hq=16, D=128, dev="cuda") -> dict:
    g = torch.Generator(device=dev).manual_seed(S)
    q, k, v = (torch.randn(B, h, S, D, device=dev, dtype=torch.bfloat16, generator=g) for h in (Hq, Hkv, Hkv))
    u = torch.randn(B, Hkv, S, device=dev, generator=g)
    do = torch.randn_like(q)
    gqa, keys = Hkv != Hq, topk + window
    big = S > 65536  # keep the dense baseline's repetitions affordable at 128K
    r = {"S": S, "B": B, "Hkv": Hkv, "topk": topk, "window": window}
    _, _, flex = _flex()
    masks = {"flex_window": flex_window_mask(S, keys, dev), "flex_topk": flex_topk_mask(S, keys, dev)}
    calls = {
        "sparsek": lambda q, k, v, u: sparsek_ops.sparsek_attention(q, k, v, u, topk=topk, window=window,
                                                                     backend="triton"),
        "sdpa": lambda q, k, v, u: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),
        "flex_window": lambda q, k, v, u: flex(q, k, v, block_mask=masks["flex_window"], enable_gqa=gqa),
        "flex_topk": lambda q, k, v, u: flex(q, k, v, block_mask=masks["flex_topk"], enable_gqa=gqa),
    }
    grad_inputs = [x.detach().clone().requires_grad_() for x in (q, k, v, u)]
    for m, fn in calls.items():
        rep = 60 if big else 200
        warm = 10 if big else 50
        with torch.no_grad():
            r[f"{m}_fwd_ms"] = do_bench(lambda: fn(q, k, v, u), warmup=warm, rep=rep, return_mode="median")
        r[f"{m}_fwdbwd_ms"] = do_bench(lambda: fn(*grad_inputs).backward(do), warmup=warm // 2, rep=rep // 2,
                                       return_mode="median")
        r[f"{m}_bwd_ms"] = r[f"{m}_fwdbwd_ms"] - r[f"{m}_fwd_ms"]
    bm = block_queries(D, D, torch.bfloat16, Hq // Hkv)  # the forward's selection, as it calls it
    r["selection_ms"] = do_bench(lambda: gpu_selection.select(u, topk, window, bm, fractional=False),
                                 return_mode="median")
    flops = 4 * S * keys * D * Hq * B
    for m in METHODS:
        f = 2 * S * S * D * Hq * B if m == "sdpa" else flops
        r[f"{m}_fwd_tflops"] = f / r[f"{m}_fwd_ms"] / 1e9
        r[f"{m}_fwdbwd_tflops"] = 3.5 * f / r[f"{m}_fwdbwd_ms"] / 1e9
    return r


def table(rows, header) -> list[str]:
    lines = [header, "",
             "| S | Hkv | SPARSEK fwd / bwd / fwd+bwd | selection | SDPA fwd / fwd+bwd | Flex window fwd / fwd+bwd "
             "| Flex top-k fwd / fwd+bwd | SPARSEK vs SDPA fwd / fwd+bwd | TFLOP/s fwd+bwd SPARSEK / Flex window / Flex top-k |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['S']} | {r['Hkv']} | {r['sparsek_fwd_ms']:.3g} / {r['sparsek_bwd_ms']:.3g} / {r['sparsek_fwdbwd_ms']:.3g} "
            f"| {r['selection_ms']:.3g} | {r['sdpa_fwd_ms']:.3g} / {r['sdpa_fwdbwd_ms']:.3g} "
            f"| {r['flex_window_fwd_ms']:.3g} / {r['flex_window_fwdbwd_ms']:.3g} "
            f"| {r['flex_topk_fwd_ms']:.3g} / {r['flex_topk_fwdbwd_ms']:.3g} "
            f"| {r['sdpa_fwd_ms'] / r['sparsek_fwd_ms']:.2f}x / {r['sdpa_fwdbwd_ms'] / r['sparsek_fwdbwd_ms']:.2f}x "
            f"| {r['sparsek_fwdbwd_tflops']:.0f} / {r['flex_window_fwdbwd_tflops']:.0f} / {r['flex_topk_fwdbwd_tflops']:.0f} |")
    return lines


def plot(rows, path, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = dict(zip(METHODS, ("C3", "C0", "C2", "C1")))
    for Hkv, style in zip(sorted({r["Hkv"] for r in rows}, reverse=True), ("-", "--", ":")):
        rs = sorted((r for r in rows if r["Hkv"] == Hkv), key=lambda r: r["S"])
        S = [r["S"] for r in rs]
        for m in METHODS:
            kw = dict(color=colors[m], linestyle=style, marker="o", ms=3, label=f"{LABELS[m]}, Hkv {Hkv}")
            axes[0].plot(S, [r[f"{m}_fwdbwd_ms"] for r in rs], **kw)
            axes[2].plot(S, [r[f"{m}_fwdbwd_tflops"] for r in rs], **kw)
            if m != "sdpa":
                axes[1].plot(S, [r["sdpa_fwdbwd_ms"] / r[f"{m}_fwdbwd_ms"] for r in rs], **kw)
    axes[0].set(xscale="log", yscale="log", ylabel="forward+backward (ms)", title="time (log-log)")
    axes[1].set(xscale="log", yscale="log", ylabel="SDPA time / time", title="speed-up over SDPA causal, forward+backward")
    axes[1].axhline(1, color="grey", lw=0.8)
    axes[2].set(xscale="log", ylabel="TFLOP/s", title="forward+backward TFLOP/s")
    seqs = sorted({r["S"] for r in rows})
    for ax in axes:
        ax.set_xlabel("sequence length S (B * S = 32K)")
        ax.set_xticks(seqs, [f"{s // 1024}K" for s in seqs])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--pairs", nargs="+", default=["1024:1024"])
    ap.add_argument("--kv", type=int, nargs="+", default=[16, 2])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    err = check("cuda")
    _allow_recompiles()
    rows = []
    for S in args.seqs:
        for pair in args.pairs:
            topk, window = map(int, pair.split(":"))
            for Hkv in args.kv:
                t0 = time.perf_counter()
                r = measure(S, max(1, args.tokens // S), Hkv, topk, window)
                r["wall_s"] = time.perf_counter() - t0
                rows.append(r)
                print(json.dumps(r), flush=True)
    date = datetime.date.today().isoformat()
    name = torch.cuda.get_device_name()
    cmd = "python3 bench/gpu_bench.py " + " ".join(sys.argv[1:])
    header = (f"{date}, {name}, torch {torch.__version__}, triton {__import__('triton').__version__}; `{cmd}`; "
              f"bf16, Hq=16, D=128, B*S={args.tokens}; median ms (do_bench); SPARSEK check vs causal SDPA at "
              f"topk >= S: rel. error {err:.1e}")
    lines = table(rows, header)
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump({"date": date, "device": name, "torch": torch.__version__, "command": cmd, "rows": rows,
                   "table": lines}, f, indent=1)
    with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, os.path.join(args.out, "gpu_bench.png"), f"{name}, {date}: bf16, Hq=16, D=128, B*S=32K, "
         f"topk:window {' '.join(args.pairs)}")


if __name__ == "__main__":
    main()
