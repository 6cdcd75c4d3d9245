"""Where the PyTorch selection spends its time on the GPU (issue 3 groundwork).

    PYTHONPATH=$PWD python3 bench/profile_selection.py [--seq 32768] [--rows 16] [--topk 1024]

Prints the wall time of each stage of ``selection.select`` (synchronised) and the top ops of
a torch.profiler trace.
"""

import argparse
import time

import torch

from sparsek_ops import selection as sl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--topk", type=int, default=1024)
    ap.add_argument("--window", type=int, default=1024)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    u = torch.randn(1, args.rows, args.seq, device=dev)
    sl.select(u, args.topk, args.window, 32, fractional=False)
    uc = u.reshape(args.rows, -1).double()

    def timed(name, fn):
        torch.cuda.synchronize() if dev == "cuda" else None
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize() if dev == "cuda" else None
        print(f"{name:24s} {(time.perf_counter() - t) * 1e3:8.2f} ms")
        return out

    order = timed("sort", lambda: sl.sort_desc(uc))
    timed("prefix_threshold", lambda: sl.prefix_threshold(uc, args.topk))
    rank = timed("ranks", lambda: sl.ranks(uc, order))
    kth = timed("prefix_kth_rank", lambda: sl.prefix_kth_rank(rank, args.topk))
    ev = timed("eviction", lambda: sl.eviction(rank, kth, args.window))
    timed("block_lists", lambda: sl.block_lists(ev, args.topk, args.window, 32))
    timed("select (all)", lambda: sl.select(u, args.topk, args.window, 32, fractional=False))
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as p:
        sl.select(u, args.topk, args.window, 32, fractional=False)
    key = "cuda_time_total" if dev == "cuda" else "cpu_time_total"
    print(p.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main()
