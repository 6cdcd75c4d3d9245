"""The slot sweeps (kernels/slots.py: entry blocks, later blocks, parked sums) alone on the GPU:
time per launch config (rows:slots:warps:stages[:maxnreg], the register cap
``slots.SWEEP_MAXNREG``), registers and spills of the main sweep, at the
standard workload. Diagnostics for tuning, not a regression benchmark.

    PYTHONPATH=$PWD python3 bench/gpu_slots.py [--S 32768] [--Hkv 16] [--slope 0] --out $OUT
"""

import argparse
import importlib
import json
import os

import torch
import triton

from sparsek_ops.kernels.selection import select_for
from sparsek_ops.selection import fractional_ranges


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=32768)
    ap.add_argument("--Hkv", type=int, default=16)
    ap.add_argument("--slope", type=float, default=0.0)
    ap.add_argument("--configs", default="64:64:4:1,64:64:8:1,128:64:8:1,64:32:4:1,128:32:8:1,64:64:8:2")
    ap.add_argument("--variants", default="sparsek_ops.kernels.slots",
                    help="comma-separated module[+FLAG=1...]: slots modules to time, with extra constexprs")
    ap.add_argument("--programs-per-sm", type=int, nargs="+", default=[None],
                    help="slots.PROGRAMS_PER_SM values to time (query segments are added until about this many)")
    ap.add_argument("--out", default=".")
    a = ap.parse_args()
    S, Hq, Hkv, D, topk, window = a.S, 16, a.Hkv, 128, 1024, 1024
    B = max(1, 32768 // S)
    R, G = B * Hkv, Hq // Hkv
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, Hq, S, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16, generator=g)
    do = torch.randn(B, Hq, S, D, device=dev, dtype=torch.bfloat16, generator=g)
    u = torch.randn(B, Hkv, S, device=dev, generator=g) + a.slope * torch.arange(S, device=dev)
    lse = torch.randn(B, Hq, S, device=dev) + 8
    shift = torch.randn(B, Hq, S, device=dev) * 0.01
    sel = select_for(u, topk, window, 64, fractional=True)
    tau = sel.tau.contiguous()
    evict = sel.evict.clamp_max(S).to(torch.int32).contiguous()
    u64 = u.reshape(R, S).double().contiguous()
    f_lo, f_hi = fractional_ranges(tau, u64, window)
    frac = torch.stack([f_lo, f_hi], -1).to(torch.int32).contiguous()
    rows = []
    ref = None
    for variant in a.variants.split(","):
        name, *flags = variant.split("+")
        mod = importlib.import_module(name)
        extra = {f.split("=")[0]: bool(int(f.split("=")[1])) for f in flags}
        for cfg, pps in ((c, p) for c in a.configs.split(",") for p in a.programs_per_sm):
            bm, bs, warps, stages, *cap = (int(x) for x in cfg.split(":"))
            if pps is not None:
                mod.PROGRAMS_PER_SM = pps
            mod.SLOTS_PER_TILE = bs
            mod.SWEEP_WARPS, mod.SWEEP_STAGES = warps, stages
            mod.SWEEP_MAXNREG = cap[0] if cap else None
            BM = max(bm, G)
            meta = dict(G=G, D=D, DV_=D, BD=D, BDV=D, BM=BM, PRECISION="tf32", num_stages=stages, **extra)
            dk = torch.zeros(R, S, D, device=dev)
            dv = torch.zeros(R, S, D, device=dev)
            du = torch.zeros(R, S, device=dev, dtype=torch.float64)

            def run():
                mod.add_selected_grads(q, k, v, do, lse, shift, u64, tau, evict, frac, dk, dv, du, topk, window,
                                       D ** -0.5, meta)
            run()
            got = (dk.clone(), dv.clone(), du.clone())
            if ref is None:
                ref = got
            err = [float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(got, ref)]
            ms = triton.testing.do_bench(run, warmup=5, rep=50)
            info = {}
            for ck in mod._bwd_slot_sweep.device_caches[torch.cuda.current_device()][0].values():
                info = dict(regs=getattr(ck, "n_regs", None), spills=getattr(ck, "n_spills", None))
            rows.append(dict(variant=variant, config=cfg, programs_per_sm=mod.PROGRAMS_PER_SM, ms=round(ms, 3), rel_err_vs_first=[f"{e:.1e}" for e in err],
                             **info))
            print(rows[-1], flush=True)
    with open(os.path.join(a.out, f"gpu_slots_{S}_{Hkv}.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
