"""GPU benchmark (DESIGN.md section 6), run on the lent machine by bench/gpu_run.sh.

Standard workload: bf16, Hq = 16, D = 128, B * S = 32K tokens, (topk, window) pairs, Hkv = 16
and 2. Side by side in one run: SPARSEK forward (backend "triton", selection included), the
selection alone, SPARSEK forward+backward, SDPA causal, and FlexAttention with a sliding window
of the same keys per query (topk + window). TFLOP/s count 4 * S * (topk + window) * D * Hq * B
per forward (SDPA: its causal work, 2 * S^2 * D * Hq * B). Times are medians of
``triton.testing.do_bench``. Every SPARSEK configuration is first checked against SDPA at
topk >= S (where it is causal attention).

    python bench/gpu_bench.py [--seqs 4096 32768] [--pairs 1024:1024] [--kv 16 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import sparsek_ops
from sparsek_ops import selection


def flex_sliding(q, k, v, keys, gqa):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    S = q.shape[2]

    def mask_mod(b, h, qi, kv):
        return (kv <= qi) & (qi - kv < keys)

    block_mask = create_block_mask(mask_mod, None, None, S, S, device=q.device)
    fn = torch.compile(flex_attention)
    return lambda: fn(q, k, v, block_mask=block_mask, enable_gqa=gqa)


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--pairs", nargs="+", default=["1024:1024"])
    ap.add_argument("--kv", type=int, nargs="+", default=[16, 2])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--backward", action="store_true", help="also time SPARSEK forward+backward")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    dev = "cuda"
    err = check(dev)
    Hq, D = 16, 128
    rows = []
    for S in args.seqs:
        B = max(1, args.tokens // S)
        for pair in args.pairs:
            topk, window = map(int, pair.split(":"))
            for Hkv in args.kv:
                g = torch.Generator(device=dev).manual_seed(S)
                q = torch.randn(B, Hq, S, D, device=dev, dtype=torch.bfloat16, generator=g)
                k = torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16, generator=g)
                v = torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16, generator=g)
                u = torch.randn(B, Hkv, S, device=dev, generator=g)
                gqa = Hkv != Hq
                r = {"S": S, "B": B, "Hkv": Hkv, "topk": topk, "window": window}
                t0 = time.perf_counter()
                r["sparsek_fwd_ms"] = do_bench(lambda: sparsek_ops.sparsek_attention(
                    q, k, v, u, topk=topk, window=window, backend="triton"), warmup=50, rep=200, return_mode="median")
                r["selection_ms"] = do_bench(lambda: selection.select(u, topk, window, 32, fractional=False),
                                             warmup=50, rep=200, return_mode="median")
                r["sdpa_fwd_ms"] = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),
                                            warmup=50, rep=200, return_mode="median")
                r["flex_fwd_ms"] = do_bench(flex_sliding(q, k, v, topk + window, gqa), warmup=50, rep=200,
                                            return_mode="median")
                if args.backward:
                    qg, kg, vg, ug = (x.detach().clone().requires_grad_() for x in (q, k, v, u))
                    do = torch.randn_like(q)

                    def fb():
                        sparsek_ops.sparsek_attention(qg, kg, vg, ug, topk=topk, window=window, backend="triton").backward(do)

                    r["sparsek_fwdbwd_ms"] = do_bench(fb, warmup=1, rep=3, return_mode="median")
                flops = 4 * S * (topk + window) * D * Hq * B
                r["sparsek_tflops"] = flops / r["sparsek_fwd_ms"] / 1e9
                r["sdpa_tflops"] = 2 * S * S * D * Hq * B / r["sdpa_fwd_ms"] / 1e9
                r["flex_tflops"] = flops / r["flex_fwd_ms"] / 1e9
                r["wall_s"] = time.perf_counter() - t0
                rows.append(r)
                print(json.dumps(r), flush=True)
    name = torch.cuda.get_device_name()
    lines = [f"{name}, torch {torch.__version__}; bf16, Hq={Hq}, D={D}, B*S={args.tokens}; median ms "
             f"(do_bench); check vs causal SDPA at topk >= S: rel. error {err:.1e}", "",
             "| S | Hkv | topk:window | SPARSEK fwd | selection | SDPA causal fwd | Flex window fwd | SPARSEK TFLOP/s | Flex TFLOP/s | vs SDPA |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['S']} | {r['Hkv']} | {r['topk']}:{r['window']} | {r['sparsek_fwd_ms']:.3f} | "
                     f"{r['selection_ms']:.3f} | {r['sdpa_fwd_ms']:.3f} | {r['flex_fwd_ms']:.3f} | "
                     f"{r['sparsek_tflops']:.0f} | {r['flex_tflops']:.0f} | {r['sdpa_fwd_ms'] / r['sparsek_fwd_ms']:.2f}x |")
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump({"rows": rows, "table": lines}, f, indent=1)


if __name__ == "__main__":
    main()
