"""Time the Triton forward kernel alone, one launch configuration at a time (CUDA only).

Standard workload (DESIGN.md section 6): bf16, B = 1, Hq = 16, D = Dv = 128, S = 32K,
topk = window = 1024, Hkv = 16 and 2 (G = 1 and 8). The selection is computed once per
block size, outside the timing, and handed to ``kernels.forward.forward(..., cfg=, sel=)``, so
the times are the kernel (plus two empty allocations). TFLOP/s count
``4 * S * (topk + window) * D * Hq`` per forward. Each configuration is first checked against
the PyTorch backend (float32) at a small shape of the same head layout.

    python bench/gpu_forward_configs.py [--out DIR] [--configs 128:64:8:2 64:32:4:3:1 ...]
                                        [--seq 32768] [--kv 16 2] [--topk 1024] [--window 1024]

Also times the first configuration with scores that carry a recency slope (``--slope``), where
nearly every gather chunk needs the selection mask. Prints a markdown table and writes
gpu_forward_configs.json under --out. About a minute on an H100, most of it compiling (one
kernel per configuration and group size). ``--dry-run`` runs the same code on CPU tensors in
Triton's interpreter at a tiny shape (a check of the script, no timing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from sparsek_ops import cpu  # noqa: E402
from sparsek_ops.kernels import common  # noqa: E402
from sparsek_ops.kernels import forward as fwd  # noqa: E402

# block_m:block_n:num_warps:num_stages[:lazy_rescale]; the first is what config() picks for D = 128
# bf16. Registers of the sm_90 builds (G = 1): 128:64:8:2 255 + 144 B spilled (outside the hot
# path), 128:32:8:3 232, 64:32:4:3 233 (two programs per SM), 64:64:4:3 255 + 144 B.
CANDIDATES = ["128:64:8:2", "128:64:8:2:1", "128:64:8:3", "128:64:8:3:1", "128:32:8:3", "128:32:8:3:1",
              "64:32:4:3:1", "64:64:4:3"]


def parse(c: str) -> fwd.Config:
    bm, bn, w, st, *lazy = map(int, c.split(":"))
    return fwd.Config(bm, bn, w, st, bool(lazy and lazy[0]))


def inputs(S, Hq, Hkv, D, dtype, seed, device, slope=0.0):
    """q, k, v in dtype and scores ``2 * randn + slope * position`` (a recency slope, as a trained
    scorer has, makes each new pair evict an old one: nearly every gather chunk then needs the mask)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, Hq, S, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, Hkv, S, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(1, Hkv, S, D, device=device, dtype=dtype, generator=g)
    u = torch.randn(1, Hkv, S, device=device, generator=g) * 2 + slope * torch.arange(S, device=device)
    return q, k, v, u


def check(cfg, Hq, Hkv, D, topk, window, S, device, dtype) -> float:
    """Max abs error of out and lse against the PyTorch backend (float32 on the same values)."""
    q, k, v, u = inputs(S, Hq, Hkv, D, dtype, 1, device)
    scale = D ** -0.5
    out, lse = fwd.forward(q, k, v, u, topk, window, scale, cfg=cfg)
    ref, ref_lse = cpu.forward(q.float(), k.float(), v.float(), u, topk, window, scale)
    return max((out.float() - ref).abs().max().item(), (lse - ref_lse).abs().max().item())


def timer(device):
    if device == "cuda":
        return lambda fn, rep: do_bench(fn, warmup=5, rep=rep, return_mode="median")

    def wall(fn, rep):  # --dry-run: one call, wall clock
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return wall


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=CANDIDATES,
                    help="block_m:block_n:num_warps:num_stages[:lazy_rescale (0/1)]")
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--kv", type=int, nargs="+", default=[16, 2])
    ap.add_argument("--topk", type=int, default=1024)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--slope", type=float, default=1e-3,
                    help="also time the first config with scores 2 * randn + slope * position (0: skip)")
    ap.add_argument("--rep", type=int, default=60, help="do_bench rep (ms)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU tensors under TRITON_INTERPRET=1, float16, tiny shapes: checks the script, times nothing")
    args = ap.parse_args()
    device, dtype = ("cpu", torch.float16) if args.dry_run else ("cuda", torch.bfloat16)
    if args.dry_run:
        args.seq, args.topk, args.window = min(args.seq, 160), min(args.topk, 24), min(args.window, 16)
    S, Hq, D, topk, window = args.seq, 16, 128, args.topk, args.window
    flops = 4 * S * (topk + window) * D * Hq
    bench = timer(device)
    rows = []
    t_start = time.perf_counter()
    for Hkv in args.kv:
        G = Hq // Hkv
        runs = [(c, 0.0) for c in args.configs] + ([(args.configs[0], args.slope)] if args.slope else [])
        data, sels = {}, {}
        for c, slope in runs:
            cfg = parse(c)
            BMQ = common.queries_per_block(common.rows_per_tile(cfg.block_m, G), G)
            r = {"config": c, "Hkv": Hkv, "G": G, "BMQ": BMQ, "S": S, "topk": topk, "window": window, "slope": slope}
            t0 = time.perf_counter()
            try:
                if slope == 0.0:
                    small = min(S, 2048)
                    r["check_err"] = check(cfg, Hq, Hkv, D, min(topk, small // 8), min(window, small // 8), small,
                                           device, dtype)
                if slope not in data:
                    data[slope] = inputs(S, Hq, Hkv, D, dtype, 0, device, slope)
                q, k, v, u = data[slope]
                if (BMQ, slope) not in sels:
                    sel = fwd.selection_for(u, topk, window, BMQ)
                    sels[BMQ, slope] = (sel, bench(lambda: fwd.selection_for(u, topk, window, BMQ), 30))
                sel, r["selection_ms"] = sels[BMQ, slope]
                scale = D ** -0.5
                r["kernel_ms"] = bench(lambda: fwd.forward(q, k, v, u, topk, window, scale, cfg=cfg, sel=sel), args.rep)
                r["tflops"] = flops / r["kernel_ms"] / 1e9
            except Exception as e:  # a config that does not compile (shared memory, registers) is a row too
                r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            r["wall_s"] = time.perf_counter() - t0
            rows.append(r)
            print(json.dumps(r), flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "dry run (CPU, interpreter)"
    lines = [f"{name}, torch {torch.__version__}; {str(dtype)[6:]}, B=1, Hq={Hq}, D={D}, S={S}, topk={topk}, "
             f"window={window}; kernel alone (selection precomputed), median ms of do_bench; "
             f"{time.perf_counter() - t_start:.0f} s in all",
             "", "| Hkv | G | block_m:block_n:warps:stages[:lazy] | queries/block | scores | kernel ms | TFLOP/s "
             "| selection ms | check err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        scores = f"randn + {r['slope']:g} i" if r["slope"] else "randn"
        head = f"| {r['Hkv']} | {r['G']} | {r['config']} | {r['BMQ']} | {scores} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80]} | | | |")
        else:
            err = f"{r['check_err']:.1e}" if "check_err" in r else ""
            lines.append(f"{head} {r['kernel_ms']:.3f} | {r['tflops']:.0f} | {r['selection_ms']:.2f} | {err} |")
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_forward_configs.json"), "w") as f:
        json.dump({"rows": rows, "table": lines}, f, indent=1)


if __name__ == "__main__":
    main()
