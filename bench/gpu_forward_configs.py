"""Time the Triton forward kernel alone, one launch configuration at a time (CUDA only).

Standard workload (DESIGN.md section 6): bf16, B = 1, Hq = 16, D = Dv = 128, S = 32K,
topk = window = 1024, Hkv = 16 and 2 (G = 1 and 8). The selection is computed once per
block size, outside the timing, and handed to ``kernels.forward.forward(..., cfg=, sel=)``, so
the times are the kernel (plus two empty allocations). TFLOP/s count
``4 * S * (topk + window) * D * Hq`` per forward. Each configuration is first checked against
the PyTorch backend (float32) at a small shape of the same head layout.

    python bench/gpu_forward_configs.py [--out DIR] [--configs 128:64:8:2 64:32:4:3 ...]
                                        [--seq 32768] [--kv 16 2] [--topk 1024] [--window 1024]

Prints a markdown table and writes gpu_forward_configs.json under --out. About a minute on an
H100, most of it compiling (one kernel per configuration and group size).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from sparsek_ops import cpu  # noqa: E402
from sparsek_ops.kernels import common  # noqa: E402
from sparsek_ops.kernels import forward as fwd  # noqa: E402

# (block_m, block_n, num_warps, num_stages); the first is what config() picks for D = 128 bf16.
CANDIDATES = ["128:64:8:2", "128:64:8:3", "128:64:4:2", "128:32:4:3", "128:128:8:2", "64:64:4:3",
              "64:32:4:2", "256:32:8:2"]


def parse(c: str) -> fwd.Config:
    return fwd.Config(*map(int, c.split(":")))


def inputs(S, Hq, Hkv, D, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, Hq, S, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(1, Hkv, S, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(1, Hkv, S, D, device="cuda", dtype=dtype, generator=g)
    u = torch.randn(1, Hkv, S, device="cuda", generator=g) * 2
    return q, k, v, u


def check(cfg, Hq, Hkv, D, topk, window) -> float:
    """Max abs error against the PyTorch backend (float32 on the same bf16 values), S = 2048."""
    q, k, v, u = inputs(2048, Hq, Hkv, D, torch.bfloat16, 1)
    scale = D ** -0.5
    out, lse = fwd.forward(q, k, v, u, topk, window, scale, cfg=cfg)
    ref, ref_lse = cpu.forward(q.float(), k.float(), v.float(), u, topk, window, scale)
    return max((out.float() - ref).abs().max().item(), (lse - ref_lse).abs().max().item())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=CANDIDATES, help="block_m:block_n:num_warps:num_stages")
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--kv", type=int, nargs="+", default=[16, 2])
    ap.add_argument("--topk", type=int, default=1024)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    S, Hq, D, topk, window = args.seq, 16, 128, args.topk, args.window
    flops = 4 * S * (topk + window) * D * Hq
    rows = []
    t_start = time.perf_counter()
    for Hkv in args.kv:
        G = Hq // Hkv
        q, k, v, u = inputs(S, Hq, Hkv, D, torch.bfloat16, 0)
        sels = {}
        for c in args.configs:
            cfg = parse(c)
            BMQ = common.queries_per_block(common.rows_per_tile(cfg.block_m, G), G)
            r = {"config": c, "Hkv": Hkv, "G": G, "BMQ": BMQ, "S": S, "topk": topk, "window": window}
            t0 = time.perf_counter()
            try:
                r["check_err"] = check(cfg, Hq, Hkv, D, topk=min(topk, 256), window=min(window, 256))
                if BMQ not in sels:
                    sel = fwd.selection_for(u, topk, window, BMQ)
                    sel_ms = do_bench(lambda: fwd.selection_for(u, topk, window, BMQ), warmup=2, rep=50,
                                      return_mode="median")
                    sels[BMQ] = (sel, sel_ms)
                sel, r["selection_ms"] = sels[BMQ]
                scale = D ** -0.5
                r["kernel_ms"] = do_bench(lambda: fwd.forward(q, k, v, u, topk, window, scale, cfg=cfg, sel=sel),
                                          warmup=10, rep=args.rep, return_mode="median")
                r["tflops"] = flops / r["kernel_ms"] / 1e9
            except Exception as e:  # a config that does not compile (shared memory, registers) is a row too
                r["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            r["wall_s"] = time.perf_counter() - t0
            rows.append(r)
            print(json.dumps(r), flush=True)
    name = torch.cuda.get_device_name()
    lines = [f"{name}, torch {torch.__version__}; bf16, B=1, Hq={Hq}, D={D}, S={S}, topk={topk}, window={window}; "
             f"kernel alone (selection precomputed), median ms of do_bench; {time.perf_counter() - t_start:.0f} s in all",
             "", "| Hkv | G | block_m:block_n:warps:stages | queries/block | kernel ms | TFLOP/s | selection ms | check err |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['Hkv']} | {r['G']} | {r['config']} | {r['BMQ']} | failed: {r['error'][:60]} | | | |")
        else:
            lines.append(f"| {r['Hkv']} | {r['G']} | {r['config']} | {r['BMQ']} | {r['kernel_ms']:.3f} | "
                         f"{r['tflops']:.0f} | {r['selection_ms']:.2f} | {r['check_err']:.1e} |")
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_forward_configs.json"), "w") as f:
        json.dump({"rows": rows, "table": lines}, f, indent=1)


if __name__ == "__main__":
    main()
