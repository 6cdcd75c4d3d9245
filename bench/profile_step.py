"""Kernel-by-kernel CUDA time of one SPARSEK forward+backward (backend "triton") on the GPU.

    python bench/profile_step.py [--S 32768] [--Hkv 16] [--topk 1024] [--window 1024] [--slope 0.0]

Standard workload otherwise (bf16, Hq = 16, D = 128, B * S = 32K). Prints the top kernels by
CUDA time per step, to see where the time goes before tuning anything.
"""

import argparse

import torch

import sparsek_ops


def kernel_times(fn, reps: int = 3) -> list[tuple[float, int, str]]:
    """CUDA time of every kernel that ``fn`` launches: (ms per call, launches per call, name),
    largest first; after two warm-up calls, over ``reps`` profiled calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        t = e.cuda_time_total if t is None else t
        if t > 0:
            rows.append((t / reps / 1000, e.count // reps, e.key[:90]))
    return sorted(rows, reverse=True)


def standard_step(S: int, Hkv: int, topk: int = 1024, window: int = 1024, slope: float = 0.0):
    """One SPARSEK forward+backward (backend "triton") on the standard workload's inputs: bf16,
    Hq = 16, D = 128, B * S = 32K, scores randn + slope * position. Returns (step, B)."""
    Hq, D = 16, 128
    B = max(1, 32768 // S)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, h, S, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (Hq, Hkv, Hkv))
    u = (torch.randn(B, Hkv, S, device="cuda", generator=g) + slope * torch.arange(S, device="cuda")).requires_grad_()
    do = torch.randn(B, Hq, S, D, device="cuda", dtype=torch.bfloat16, generator=g)

    def step():
        sparsek_ops.sparsek_attention(q, k, v, u, topk=topk, window=window, backend="triton").backward(do)

    return step, B


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=32768)
    ap.add_argument("--Hkv", type=int, default=16)
    ap.add_argument("--topk", type=int, default=1024)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--slope", type=float, default=0.0, help="scores randn + slope * position")
    args = ap.parse_args()
    S = args.S
    step, B = standard_step(S, args.Hkv, args.topk, args.window, args.slope)
    rows = kernel_times(step)
    print(f"S={S} B={B} Hkv={args.Hkv} topk={args.topk} window={args.window} slope={args.slope}")
    print(f"total CUDA ms per step: {sum(r[0] for r in rows):.3f}")
    for ms, n, name in rows[: args.top]:
        print(f"{ms:9.3f} ms  x{n:<3d} {name}")


if __name__ == "__main__":
    main()
