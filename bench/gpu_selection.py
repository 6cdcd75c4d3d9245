"""Time the Triton selection (sparsek_ops/kernels/selection.py) on the GPU, phase by phase.

    python bench/gpu_selection.py [--seqs 4096 32768 131072] [--kv 16 2] [--pairs 1024:1024] [--out DIR]

For the standard workload (B * S = 32K tokens, at least B = 1): median ms of the whole selection
(forward: no |F|; backward: with |F|), next to the PyTorch selection at the smaller sizes, and a
per-kernel breakdown from torch.profiler. Block size 64 queries (Hkv = 16) or 8 (Hkv = 2, G = 8).
The medians are wall times (do_bench), bound by the host's ~40 launches at these sizes and noisy
between runs; the breakdown's "all kernels" is the GPU time, the number to compare versions by.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from triton.testing import do_bench

from sparsek_ops import selection
from profile_step import kernel_times  # bench/ is on sys.path when run as a script
from sparsek_ops.kernels import selection as gsel


def breakdown(fn) -> dict[str, float]:
    """The largest kernels of ``fn``: name (60 characters) -> ms per call, summed over the kernels
    that share those characters (the passes of a radix sort, say), the eight largest kept, and the
    sum over all of them as "all kernels" (the selection's GPU time, without the host's)."""
    out: dict[str, float] = {}
    for ms, _, name in kernel_times(fn):
        out[name[:60]] = out.get(name[:60], 0.0) + ms
    top = dict(sorted(out.items(), key=lambda kv: -kv[1])[:8])
    top["all kernels"] = sum(out.values())
    return top


def _chunks(S: int, k: int, rows: int) -> int:
    """Chunks per row (also of a package copy from before the chunk length depended on the rows)."""
    if hasattr(gsel, "live_per_chunk"):
        return len(gsel._chunk_starts(S, k, gsel.live_per_chunk(S, k, rows))) - 1
    return len(gsel._chunk_starts(S, k)) - 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 32768, 131072])
    ap.add_argument("--kv", type=int, nargs="+", default=[16, 2])
    ap.add_argument("--pairs", nargs="+", default=["1024:1024"])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--torch-max", type=int, default=32768, help="largest S to also time the PyTorch selection at")
    ap.add_argument("--live", type=int, nargs="+", default=[0],
                    help="LIVE_PER_CHUNK values to try (chunk length model; 0: live_per_chunk's choice)")
    ap.add_argument("--start", nargs="+", default=["auto"],
                    help="chunk-start configs BLOCK:WARPS:PIVOTS[:GROUP] to try (positions per sorted block, "
                         "warps, pivots per pass, blocks searched at once; at every S), or auto: the package's")
    ap.add_argument("--walk", nargs="+", default=["auto"],
                    help="walk configs TB:WARPS to try (prefixes per tile, warps per chunk), or auto: the package's")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    rows = []
    knobs = ("START_BLOCK", "START_WARPS", "PIVOTS", "START_GROUP", "START_LONG_FROM", "WALK_TB", "WALK_WARPS")
    defaults = {n: getattr(gsel, n) for n in knobs if hasattr(gsel, n)}  # "auto" puts these back
    for S in args.seqs:
        B = max(1, args.tokens // S)
        for pair in args.pairs:
            topk, window = map(int, pair.split(":"))
            for Hkv, live, start, walk in [(h, e, c, w) for h in args.kv for e in args.live for c in args.start
                                           for w in args.walk]:
                for n, x in defaults.items():
                    setattr(gsel, n, x)
                if walk != "auto":
                    gsel.WALK_TB, gsel.WALK_WARPS = map(int, walk.split(":"))
                if start != "auto":
                    cfg = list(map(int, start.split(":")))
                    gsel.START_BLOCK, gsel.START_WARPS, gsel.PIVOTS = cfg[:3]
                    if len(cfg) > 3 and cfg[3]:  # (a copy from before the sorted blocks has no START_GROUP)
                        gsel.START_GROUP = cfg[3]
                    gsel.START_LONG_FROM = 1 << 62  # the given config at every S
                if live or hasattr(gsel, "live_per_chunk"):  # (an older copy keeps its own constant)
                    gsel.LIVE_PER_CHUNK = live or None
                gsel._chunk_starts.cache_clear()
                gsel.chunk_starts.cache_clear()
                bm = 64 if Hkv == 16 else 8
                u = torch.randn(B, Hkv, S, device="cuda", generator=torch.Generator("cuda").manual_seed(S))
                r = {"S": S, "B": B, "Hkv": Hkv, "topk": topk, "window": window, "block_m": bm,
                     "live": gsel.live_per_chunk(S, topk, B * Hkv) if hasattr(gsel, "live_per_chunk") else gsel.LIVE_PER_CHUNK,
                     "start": start, "walk": walk,
                     "chunks": _chunks(S, topk, B * Hkv)}
                r["triton_fwd_ms"] = do_bench(lambda: gsel.select(u, topk, window, bm, fractional=False),
                                              warmup=5, rep=50, return_mode="median")
                r["triton_bwd_ms"] = do_bench(lambda: gsel.select(u, topk, window, bm, fractional=True),
                                              warmup=5, rep=50, return_mode="median")
                if S <= args.torch_max:
                    r["torch_fwd_ms"] = do_bench(lambda: selection.select(u, topk, window, bm, fractional=False),
                                                 warmup=2, rep=10, return_mode="median")
                r["kernels_ms"] = breakdown(lambda: gsel.select(u, topk, window, bm, fractional=True))
                rows.append(r)
                print(json.dumps(r), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_selection.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
