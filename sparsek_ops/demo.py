"""The main job (for now): run SPARSEK attention, check it against the float64 reference, and
time it next to dense causal attention (SDPA) on the same machine.

    python -m sparsek_ops.demo [--seq 16384] [--topk 256] [--window 256] [--heads 8] [--dim 64]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import reference
from .api import sparsek_attention


def check(device: str) -> dict:
    """Output and gradients of a small problem against the float64 reference."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 96, 32, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 96, 32, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 96, 16, generator=g, dtype=torch.float64)
    u = torch.randn(2, 2, 96, generator=g, dtype=torch.float64) * 2
    leaves = [x.to(device).requires_grad_() for x in (q, k, v, u)]
    out = sparsek_attention(*leaves, topk=8, window=8)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, u)]
    ref, _ = reference.attention(*ref_leaves, 8, 8)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    errs = {"out": (out.cpu() - ref).abs().max().item()}
    errs.update({f"d{n}": (a.cpu() - b).abs().max().item() for n, a, b in zip("qkvu", grads, ref_grads)})
    return errs


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=16384, help="sequence length of the timing run")
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    steps = tqdm(total=3, desc="sparsek demo", unit="step")
    result = check(args.device)
    steps.update()
    g = torch.Generator().manual_seed(1)
    shape = (1, args.heads, args.seq, args.dim)
    q, k, v = (torch.randn(*shape, generator=g).to(args.device) for _ in range(3))
    u = torch.randn(1, args.heads, args.seq, generator=g).to(args.device)
    t_sparsek = _time(lambda: sparsek_attention(q, k, v, u, topk=args.topk, window=args.window), args.repeats)
    steps.update()
    t_sdpa = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), args.repeats)
    steps.update()
    steps.close()

    print("\nCheck against the float64 reference "
          f"(B=2, Hq=4, Hkv=2, S=96, D=32, Dv=16, topk=8, window=8), max abs error:")
    for name, err in result.items():
        print(f"  {name:4s} {err:.2e}")
    print(f"\nForward time, float32, B=1, H={args.heads}, S={args.seq}, D={args.dim}, "
          f"device={args.device}, best of {args.repeats}:")
    rows = [(f"SPARSEK (topk={args.topk}, window={args.window})", t_sparsek), ("SDPA causal (dense)", t_sdpa)]
    width = max(len(name) for name, _ in rows)
    for name, t in rows:
        print(f"  {name:{width}s} {t * 1e3:9.1f} ms")
    print(f"  speed-up: {t_sdpa / t_sparsek:.2f}x")


if __name__ == "__main__":
    main()
