"""The compiled op against the eager kernels (issue 4's measure), on the lent GPU.

Standard workload (DESIGN.md section 6): bf16, Hq = 16, D = 128, B * S = 32K, topk = window =
1024, Hkv = 16 and 2. For each shape, medians of ``triton.testing.do_bench``:

* eager: ``sparsek_attention(..., backend="triton")``;
* compiled: ``torch.compile`` of the same call (the Inductor lowering: the selection as an
  extern call, the attention as the template; the backward as its two templates between extern
  calls of its other stages);
* compiled + epilogue: the same with a pointwise epilogue (``gelu(out) * 2``), which Inductor
  fuses into the template's store, against eager's separate kernels.

Forward (no grad) and forward+backward. Before timing, the compiled output is checked against
eager (same kernel, same config: bitwise for the default config).

    python3 bench/gpu_compiled.py [--seqs 32768] [--kv 16 2] [--autotune] [--out DIR]

``--autotune`` compiles with ``max_autotune`` (Inductor times the template's configs with
generated selection inputs). Writes gpu_compiled.json and gpu_compiled.md to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import sparsek_ops


def measure(S, B, Hkv, topk, window, autotune: bool, Hq=16, D=128, dev="cuda") -> dict:
    g = torch.Generator(device=dev).manual_seed(S)
    q, k, v = (torch.randn(B, h, S, D, device=dev, dtype=torch.bfloat16, generator=g) for h in (Hq, Hkv, Hkv))
    u = torch.randn(B, Hkv, S, device=dev, generator=g)
    do = torch.randn_like(q)

    def plain(q, k, v, u):
        return sparsek_ops.sparsek_attention(q, k, v, u, topk=topk, window=window, backend="triton")

    def epilogue(q, k, v, u):
        return F.gelu(plain(q, k, v, u)) * 2.0

    torch._dynamo.reset()
    opts = {"max_autotune": True} if autotune else None
    compiled = {name: torch.compile(fn, fullgraph=True, options=opts) for name, fn in
                (("plain", plain), ("epilogue", epilogue))}
    with torch.no_grad():
        same = torch.equal(compiled["plain"](q, k, v, u), plain(q, k, v, u))
    r = {"S": S, "B": B, "Hkv": Hkv, "topk": topk, "window": window, "autotune": autotune,
         "compiled_equals_eager": same}
    grads = [x.detach().clone().requires_grad_() for x in (q, k, v, u)]
    for name, fn in (("eager", plain), ("compiled", compiled["plain"]), ("eager_epilogue", epilogue),
                     ("compiled_epilogue", compiled["epilogue"])):
        with torch.no_grad():
            r[f"{name}_fwd_ms"] = do_bench(lambda: fn(q, k, v, u), warmup=50, rep=200, return_mode="median")
        r[f"{name}_fwdbwd_ms"] = do_bench(lambda: fn(*grads).backward(do), warmup=25, rep=100,
                                          return_mode="median")
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[32768])
    ap.add_argument("--kv", type=int, nargs="+", default=[16, 2])
    ap.add_argument("--pair", default="1024:1024", help="topk:window")
    ap.add_argument("--autotune", action="store_true")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_compiled.py needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    topk, window = (int(x) for x in args.pair.split(":"))
    rows = []
    for S in args.seqs:
        for Hkv in args.kv:
            r = measure(S, max(1, 32768 // S), Hkv, topk, window, args.autotune)
            print(json.dumps(r), flush=True)
            rows.append(r)
    head = (f"{datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}; "
            f"`python3 bench/gpu_compiled.py {' '.join(sys.argv[1:])}`; bf16, Hq=16, D=128, "
            f"topk={topk}, window={window}; median ms (do_bench)")
    lines = [head, "", "| S | Hkv | eager fwd / fwd+bwd | compiled fwd / fwd+bwd | eager + epilogue | "
             "compiled + epilogue | compiled == eager |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cell = lambda m: f"{r[m + '_fwd_ms']:.3g} / {r[m + '_fwdbwd_ms']:.3g}"  # noqa: E731
        lines.append(f"| {r['S']} | {r['Hkv']} | {cell('eager')} | {cell('compiled')} | {cell('eager_epilogue')} | "
                     f"{cell('compiled_epilogue')} | {r['compiled_equals_eager']} |")
    print("\n".join(lines))
    with open(os.path.join(args.out, "gpu_compiled.json"), "w") as f:
        json.dump({"header": head, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "gpu_compiled.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
