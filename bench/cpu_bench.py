"""CPU benchmark of SPARSEK attention next to dense causal SDPA, in one run.

Workload (issue 2): B = 1, Hq = Hkv = 8, D = 64, topk = window = 256, float32,
S in {2K, 8K, 16K}. Reports forward and forward+backward time (best of --repeats, after a
warm-up) and peak memory. Each measurement runs in a fresh subprocess; peak memory is the
growth of the peak resident set (VmHWM, reset once the inputs exist) over the resident set
at that moment, so it counts what the attention itself allocates. Linux only.

    python bench/cpu_bench.py [--seqs 2048 8192 16384] [--repeats 2] [--out bench/results]

Writes a markdown table to stdout and JSON to --out. This is a benchmark, not a test: it
checks SPARSEK against the float64 reference on a small problem first and refuses to time a
wrong kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(impl: str, S: int, mode: str, repeats: int, topk: int, window: int, heads: int, dim: int) -> dict:
    import torch
    import torch.nn.functional as F

    import sparsek_ops

    g = torch.Generator().manual_seed(0)
    grad = mode == "fwd+bwd"
    q, k, v = (torch.randn(1, heads, S, dim, generator=g).requires_grad_(grad) for _ in range(3))
    u = torch.randn(1, heads, S, generator=g).requires_grad_(grad)
    do = torch.randn(1, heads, S, dim, generator=g)

    def run():
        if impl == "sparsek":
            out = sparsek_ops.sparsek_attention(q, k, v, u, topk=topk, window=window)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if grad:
            out.backward(do)
            for x in (q, k, v, u):
                x.grad = None
        return out

    # A tiny call first: the first call of a custom op imports torch._dynamo (about 150 MiB),
    # which is not memory of the attention.
    tiny = [x.detach()[:, :, :16].clone().requires_grad_(grad) for x in (q, k, v, u)]
    if impl == "sparsek":
        out = sparsek_ops.sparsek_attention(*tiny, topk=topk, window=window)
    else:
        out = F.scaled_dot_product_attention(*tiny[:3], is_causal=True)
    if grad:
        out.sum().backward()
    base = _reset_peak_rss()
    run()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM")
    return {"impl": impl, "S": S, "mode": mode, "seconds": min(times), "all_seconds": times,
            "peak_mib": (peak - base) / 1024.0, "threads": torch.get_num_threads()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the peak resident set size (Linux: write 5 to clear_refs) and return the current
    one, in KiB, so that VmHWM afterwards is the peak of what runs from here on."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def check(topk: int, window: int) -> float:
    import torch

    import sparsek_ops
    from sparsek_ops import reference

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 200, 16, generator=g, dtype=torch.float64) for _ in range(3))
    u = torch.randn(1, 4, 200, generator=g, dtype=torch.float64)
    t, w = min(topk, 40), min(window, 40)
    out = sparsek_ops.sparsek_attention(q, k, v, u, topk=t, window=w)
    ref, _ = reference.attention(q, k, v, u, t, w)
    err = (out - ref).abs().max().item()
    if not err < 1e-10:
        raise SystemExit(f"SPARSEK disagrees with the float64 reference (max error {err:.3g}); not timing it")
    return err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "S", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        impl, S, mode = args.worker
        res = worker(impl, int(S), mode, args.repeats, args.topk, args.window, args.heads, args.dim)
        print(json.dumps(res))
        return

    from tqdm import tqdm

    err = check(args.topk, args.window)
    jobs = [(impl, S, mode) for S in args.seqs for mode in ("fwd", "fwd+bwd") for impl in ("sparsek", "sdpa")]
    results = []
    for impl, S, mode in tqdm(jobs, desc="cpu bench", unit="run"):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, str(S), mode,
               "--repeats", str(args.repeats), "--topk", str(args.topk), "--window", str(args.window),
               "--heads", str(args.heads), "--dim", str(args.dim)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"worker {impl} S={S} {mode} failed:\n{proc.stderr}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    by = {(r["impl"], r["S"], r["mode"]): r for r in results}
    lines = [
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{results[0]['threads']}; float32, B=1, Hq=Hkv={args.heads}, D={args.dim}, "
        f"topk={args.topk}, window={args.window}; best of {args.repeats}; check vs float64 reference: {err:.1e}",
        "",
        "| S | mode | SPARSEK (s) | SDPA causal (s) | speed-up | SPARSEK peak (MiB) | SDPA peak (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for S in args.seqs:
        for mode in ("fwd", "fwd+bwd"):
            a, b = by[("sparsek", S, mode)], by[("sdpa", S, mode)]
            lines.append(f"| {S} | {mode} | {a['seconds']:.3f} | {b['seconds']:.3f} | "
                         f"{b['seconds'] / a['seconds']:.2f}x | {a['peak_mib']:.0f} | {b['peak_mib']:.0f} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(args.out, f"cpu_bench-{stamp}.json"), "w") as f:
        json.dump({"args": vars(args), "check_error": err, "results": results, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
