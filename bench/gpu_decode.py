"""Decode benchmark (issue 6): the latency of one generated token's attention, SPARSEK cache
against SDPA over the full cache, in one run.

Workload: bf16, Hq = 16, D = 128, topk = window = 1024 (the standard pair of DESIGN.md section
6), contexts 8K, 32K and 128K tokens already seen, B = 1 and 8, Hkv = 16 and 2.

* SPARSEK: ``SparseKCache.decode`` (backend "triton"): the state update (ring, slot eviction,
  exact tau) and the split attention over topk + window pairs, after ``prefill`` of the context.
  Every replay is a real next token: the cache advances.
* SDPA: ``scaled_dot_product_attention`` of the one new query over every cached position
  (K and V of [B, Hkv, L, D]; ``enable_gqa`` for Hkv = 2), the dense baseline whose cache grows
  with the context.

Both are timed as CUDA graphs (``triton.testing.do_bench_cudagraph``: the GPU time of a step
without Python's launch overhead, as a ``mode="reduce-overhead"`` model runs it) and eagerly
(``do_bench``: with the launch overhead of the Python call). Medians in microseconds. Cache
bytes: all SPARSEK state tensors (keys, values, scores, tail, tau) against SDPA's K and V.
Before timing, the Triton step is checked against the PyTorch step on a copy of the cache.

    python3 bench/gpu_decode.py [--contexts 8192 32768 131072] [--batches 1 8] [--kv 16 2] [--out DIR]

Writes gpu_decode.json and gpu_decode.md to --out.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from sparsek_ops.cache import SparseKCache


def make_cache(B, Hkv, L, D, topk, window, g, dev="cuda"):
    """A cache after a context of L tokens: random keys and values, scores with the layer's
    recency slope (0.05 per position) plus noise, so the selection evicts and keeps a tail."""
    k = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16, generator=g)
    u = torch.randn(B, Hkv, L, device=dev, generator=g) * 4 + 0.05 * torch.arange(L, device=dev)
    cache = SparseKCache(B, Hkv, D, topk=topk, window=window, dtype=torch.bfloat16, device=dev)
    cache.prefill(k, v, u)
    return cache, k, v


def clone_cache(c: SparseKCache) -> SparseKCache:
    d = copy.copy(c)
    for name in SparseKCache.TENSORS:
        setattr(d, name, getattr(c, name).clone())
    return d


def check(cache, q, k1, v1, u1) -> float:
    """Largest difference between the Triton and the PyTorch decode step (output and state)."""
    a, b = clone_cache(cache), clone_cache(cache)
    oa = a.decode(q, k1, v1, u1, backend="triton")
    ob = b.decode(q, k1, v1, u1, backend="torch")
    err = (oa.float() - ob.float()).abs().max().item()
    for name in ("u_sel", "pos_sel", "flags", "k_sel", "k_win"):
        if not torch.equal(getattr(a, name), getattr(b, name)):
            raise SystemExit(f"Triton and PyTorch decode states differ in {name}")
    if not torch.allclose(a.tau, b.tau, rtol=1e-12, atol=1e-12, equal_nan=True):
        raise SystemExit("Triton and PyTorch decode give different tau")
    if not err < 2e-2:
        raise SystemExit(f"Triton decode output differs from the PyTorch step by {err:.3g}")
    return err


def measure(L, B, Hkv, topk, window, Hq=16, D=128, dev="cuda") -> dict:
    g = torch.Generator(device=dev).manual_seed(L + B + Hkv)
    cache, k, v = make_cache(B, Hkv, L, D, topk, window, g)
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16, generator=g)
    k1 = torch.randn(B, Hkv, 1, D, device=dev, dtype=torch.bfloat16, generator=g)
    v1 = torch.randn(B, Hkv, 1, D, device=dev, dtype=torch.bfloat16, generator=g)
    u1 = torch.randn(B, Hkv, 1, device=dev, generator=g) + 0.05 * L
    r = {"context": L, "B": B, "Hkv": Hkv, "topk": topk, "window": window,
         "check_max_abs_diff": check(cache, q, k1, v1, u1)}

    def ours():
        return cache.decode(q, k1, v1, u1, backend="triton")

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=Hkv != Hq)

    for name, fn in (("sparsek", ours), ("sdpa", sdpa)):
        fn()
        torch.cuda.synchronize()
        r[f"{name}_graph_us"] = 1e3 * do_bench_cudagraph(fn, rep=50, return_mode="median")
        r[f"{name}_eager_us"] = 1e3 * do_bench(fn, warmup=10, rep=50, return_mode="median")
    r["sparsek_cache_bytes"] = cache.nbytes()
    r["sdpa_cache_bytes"] = k.numel() * k.element_size() + v.numel() * v.element_size()
    r["speedup_graph"] = r["sdpa_graph_us"] / r["sparsek_graph_us"]
    r["speedup_eager"] = r["sdpa_eager_us"] / r["sparsek_eager_us"]
    r["tokens_after"] = cache.length()
    del cache, k, v
    torch.cuda.empty_cache()
    return r


def mib(x: int) -> str:
    return f"{x / 2**20:,.1f}"


def table(rows) -> str:
    head = ("| context | B | Hkv | SPARSEK graph (us) | SDPA graph (us) | speed-up | SPARSEK eager (us) | "
            "SDPA eager (us) | SPARSEK cache (MiB) | SDPA cache (MiB) |\n|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['context']} | {r['B']} | {r['Hkv']} | {r['sparsek_graph_us']:.1f} | {r['sdpa_graph_us']:.1f} | "
        f"{r['speedup_graph']:.1f}x | {r['sparsek_eager_us']:.1f} | {r['sdpa_eager_us']:.1f} | "
        f"{mib(r['sparsek_cache_bytes'])} | {mib(r['sdpa_cache_bytes'])} |\n" for r in rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--kv", type=int, nargs="+", default=[16, 2])
    ap.add_argument("--topk", type=int, default=1024)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--out", default="bench/report")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_decode.py needs a CUDA GPU")
    rows = []
    for L in args.contexts:
        for B in args.batches:
            for Hkv in args.kv:
                r = measure(L, B, Hkv, args.topk, args.window)
                rows.append(r)
                print(json.dumps(r), flush=True)
    os.makedirs(args.out, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "command": "python3 bench/gpu_decode.py " + " ".join(argv or sys.argv[1:])}
    with open(os.path.join(args.out, "gpu_decode.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = (f"Decode latency of one token's attention ({meta['date']}, {meta['gpu']}, torch {meta['torch']}; "
          f"bf16, Hq=16, D=128, topk={args.topk}, window={args.window}; medians; `{meta['command']}`)\n\n"
          + table(rows))
    with open(os.path.join(args.out, "gpu_decode.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
