"""GPU benchmark (DESIGN.md section 6), run on the lent machine by bench/gpu_run.sh.

Standard workload: bf16, Hq = 16, D = 128, B * S = 32K tokens (B = 1 beyond), (topk, window)
pairs, Hkv = 16 and 2. Side by side in one run: SPARSEK forward and forward+backward (backend
"triton", selection included), the selection alone (as the forward calls it), SDPA causal and
FlexAttention with a sliding window of the same keys per query (topk + window), forward and
forward+backward. TFLOP/s count 4 * S * (topk + window) * D * Hq * B per forward and 2.5 times
that for a backward (SDPA: its causal work, 2 * S^2 * D * Hq * B forward). Times are medians of
``triton.testing.do_bench``. The SPARSEK backend is first checked against SDPA at topk >= S
(where it is causal attention).

    python bench/gpu_bench.py [--seqs 4096 32768 131072] [--pairs 1024:1024] [--kv 16 2] [--out DIR]
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
from sparsek_ops.kernels import selection as gpu_selection


def flex_sliding(q, k, v, keys, gqa):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    S = q.shape[2]

    def mask_mod(b, h, qi, kv):
        return (kv <= qi) & (qi - kv < keys)

    try:  # _compile builds the mask block by block: no S x S tensor (128 GiB at 128K)
        block_mask = create_block_mask(mask_mod, None, None, S, S, device=q.device, _compile=True)
    except TypeError:
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
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 32768, 131072])
    ap.add_argument("--pairs", nargs="+", default=["1024:1024"])
    ap.add_argument("--kv", type=int, nargs="+", default=[16, 2])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--no-backward", action="store_true", help="forward only")
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
                big = S > 65536  # keep the dense baselines' repetitions affordable at 128K
                rep = 60 if big else 200

                def bench(fn, rep=rep):
                    return do_bench(fn, warmup=10 if big else 50, rep=rep, return_mode="median")

                r["sparsek_fwd_ms"] = bench(lambda: sparsek_ops.sparsek_attention(
                    q, k, v, u, topk=topk, window=window, backend="triton"))
                G = Hq // Hkv
                bm = max(64, 1 << (G - 1).bit_length()) // G  # the forward's queries per block
                r["selection_ms"] = bench(lambda: gpu_selection.select(u, topk, window, bm, fractional=False))
                r["sdpa_fwd_ms"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa))
                flex = flex_sliding(q, k, v, topk + window, gqa)
                r["flex_fwd_ms"] = bench(flex)
                flops = 4 * S * (topk + window) * D * Hq * B
                r["sparsek_tflops"] = flops / r["sparsek_fwd_ms"] / 1e9
                r["sdpa_tflops"] = 2 * S * S * D * Hq * B / r["sdpa_fwd_ms"] / 1e9
                r["flex_tflops"] = flops / r["flex_fwd_ms"] / 1e9
                if not args.no_backward:
                    qg, kg, vg, ug = (x.detach().clone().requires_grad_() for x in (q, k, v, u))
                    do = torch.randn_like(q)

                    def fb_sparsek():
                        sparsek_ops.sparsek_attention(qg, kg, vg, ug, topk=topk, window=window, backend="triton").backward(do)

                    def fb_sdpa():
                        F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=gqa).backward(do)

                    flex_b = flex_sliding(qg, kg, vg, topk + window, gqa)

                    def fb_flex():
                        flex_b().backward(do)

                    r["sparsek_fwdbwd_ms"] = bench(fb_sparsek, rep=rep // 2)
                    r["sdpa_fwdbwd_ms"] = bench(fb_sdpa, rep=rep // 2)
                    r["flex_fwdbwd_ms"] = bench(fb_flex, rep=rep // 2)
                    r["sparsek_fwdbwd_tflops"] = 3.5 * flops / r["sparsek_fwdbwd_ms"] / 1e9
                    r["flex_fwdbwd_tflops"] = 3.5 * flops / r["flex_fwdbwd_ms"] / 1e9
                r["wall_s"] = time.perf_counter() - t0
                rows.append(r)
                print(json.dumps(r), flush=True)
    name = torch.cuda.get_device_name()
    lines = [f"{name}, torch {torch.__version__}; bf16, Hq={Hq}, D={D}, B*S={args.tokens}; median ms "
             f"(do_bench); check vs causal SDPA at topk >= S: rel. error {err:.1e}", "",
             "| S | Hkv | topk:window | SPARSEK fwd | selection | SDPA fwd | Flex fwd | SPARSEK fwd+bwd | SDPA fwd+bwd "
             "| Flex fwd+bwd | TFLOP/s fwd (SPARSEK / Flex) | TFLOP/s fwd+bwd (SPARSEK / Flex) | vs SDPA fwd | vs SDPA fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fb = "sparsek_fwdbwd_ms" in r
        na = "-"
        lines.append(
            f"| {r['S']} | {r['Hkv']} | {r['topk']}:{r['window']} | {r['sparsek_fwd_ms']:.3f} | {r['selection_ms']:.3f} | "
            f"{r['sdpa_fwd_ms']:.3f} | {r['flex_fwd_ms']:.3f} | "
            f"{r['sparsek_fwdbwd_ms'] if fb else na:.5} | {r['sdpa_fwdbwd_ms'] if fb else na:.5} | {r['flex_fwdbwd_ms'] if fb else na:.5} | "
            f"{r['sparsek_tflops']:.0f} / {r['flex_tflops']:.0f} | "
            f"{(format(r['sparsek_fwdbwd_tflops'], '.0f') + ' / ' + format(r['flex_fwdbwd_tflops'], '.0f')) if fb else na} | "
            f"{r['sdpa_fwd_ms'] / r['sparsek_fwd_ms']:.2f}x | "
            f"{(format(r['sdpa_fwdbwd_ms'] / r['sparsek_fwdbwd_ms'], '.2f') + 'x') if fb else na} |")
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump({"rows": rows, "table": lines}, f, indent=1)


if __name__ == "__main__":
    main()
