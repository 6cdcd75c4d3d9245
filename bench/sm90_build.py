"""Builds the package's Triton kernels for the H100 (sm_90a) on a machine without a GPU, and
reports what the compiler made of them: registers, spilled bytes, shared memory, and the SASS
instructions that matter (wgmma HGMMA, mma.sync HMMA, local-memory LDL/STL), with no device
time. Diagnostics for choosing what to time on the next lease, not a benchmark: earlier
sessions found spill counts alone did not predict times (bench/NOTES.md), but a kernel whose
dots are HMMA where HGMMA was meant, or whose loop touches local memory, is worth knowing of
before a lease.

How: a stand-in Triton driver answers "sm_90, device 0" and every launch compiles without
running (``JITFunction.run(..., warmup=True)``), so the package's own host code (shapes,
constexprs, launch configs) picks exactly what the GPU would compile. The host code runs on
CPU tensors (the selection takes its PyTorch path), so what comes out of a "launch" is garbage;
only the builds count. Install the triton of the GPU image (3.6) in a venv to match it:

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install torch==2.13.0 triton==3.6.0 numpy
    PYTHONPATH=$PWD /tmp/t36/bin/python bench/sm90_build.py slots --configs 64:32:4:2 32:64:4:2
    PYTHONPATH=$PWD /tmp/t36/bin/python bench/sm90_build.py step     # every kernel of a training step
    PYTHONPATH=$PWD /tmp/t36/bin/python bench/sm90_build.py step --loops --ops 12   # each loop's length, top opcodes

Never set TRITON_INTERPRET=1 here: the interpreter compiles nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.runtime.jit import JITFunction

HOPPER = (90, 32)  # compute capability, warp size


class _CompileOnlyDriver:
    """The few driver calls a warm-up build makes: a current device, stream and target."""

    def __init__(self, capability: int, warp_size: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, warp_size)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_interface(self):
        return torch.cuda

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(capability: int = HOPPER[0], warp_size: int = HOPPER[1]):
    """Within: every Triton launch builds its kernel for the target and returns without running.
    Yields the list the builds are appended to, as (kernel name, CompiledKernel)."""
    from triton.runtime import driver

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: the interpreter builds nothing; unset it")
    built: list = []
    old_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = old_run(self, *args, grid=grid, warmup=True, **kwargs)
        built.append((self.fn.__name__, kernel))
        return kernel

    old_active = getattr(driver, "_active", None)  # reset_active() fails on a machine with no GPU driver
    driver.set_active(_CompileOnlyDriver(capability, warp_size))
    JITFunction.run = run
    try:
        yield built
    finally:
        JITFunction.run = old_run
        driver._active = old_active


def _ptxas(capability: int = HOPPER[0]) -> str:
    """The ptxas Triton itself builds with for this target (3.9 uses its newer one for sm_90)."""
    from triton.backends.nvidia import compiler

    if hasattr(compiler, "get_ptxas"):
        return compiler.get_ptxas(capability).path
    from triton import knobs

    return knobs.nvidia.ptxas.path


def resources(kernel) -> dict:
    """Registers, spill bytes, shared memory and SASS counts of one build."""
    meta = kernel.metadata
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        arch = re.search(r"\.target\s+(sm_\w+)", kernel.asm["ptx"]).group(1)
        run = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", ptx, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"ptxas failed on the build's PTX: {run.stderr[-1500:]}")
        log = run.stderr
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    sass = kernel.asm.get("sass") or ""
    count = lambda op: len(re.findall(rf"\b{op}\b", sass))  # noqa: E731
    return dict(
        regs=int(regs.group(1)) if regs else None,
        spill_store_bytes=int(stores.group(1)) if stores else None,
        spill_load_bytes=int(loads.group(1)) if loads else None,
        shared_bytes=getattr(meta, "shared", None),
        warps=getattr(meta, "num_warps", None),
        stages=getattr(meta, "num_stages", None),
        HGMMA=count("HGMMA"), HMMA=count("HMMA"), LDL=count("LDL"), STL=count("STL"),
        instructions=len(re.findall(r"/\*[0-9a-f]{4,}\*/", sass)),
    )


def _sass(kernel) -> str:
    """SASS of the build (triton fills asm['sass'] lazily on some versions, never on others)."""
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
        return subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout


def _instructions(sass: str) -> list[tuple[int, str]]:
    """(address, opcode without predicate or modifiers) of every SASS instruction, and the
    branch target for branches (as a third element, else None)."""
    out = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass):
        text = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())
        op = text.split()[0].split(".")[0] if text else ""
        tgt = re.search(r"BRA\s+(?:`?\(?\.L_x_\d+\)?|0x([0-9a-f]+))", text)
        out.append((int(m.group(1), 16), op, int(tgt.group(1), 16) if tgt and tgt.group(1) else None))
    return out


def loops(sass: str, ops: int = 0) -> list[dict]:
    """Every loop (a backward branch's range) that holds matrix instructions: its address range,
    length, matrix, exp, local-memory, global-load and float64 instructions, and the
    instructions its forward branches can skip (an ``if`` inside it: the length of a pass that
    takes every such branch); with ``ops``, its ``ops`` most frequent opcodes too."""
    ins = _instructions(sass)
    out = []
    for addr, op, tgt in ins:
        if op != "BRA" or tgt is None or tgt >= addr:
            continue
        body = [(a, o, t) for a, o, t in ins if tgt <= a <= addr]
        n = lambda *names: sum(o in names for _, o, _ in body)  # noqa: E731
        mma = n("HGMMA", "HMMA")
        if not mma:
            continue
        skip = sum(sum(1 for a2, _, _ in body if a < a2 < t) for a, o, t in body
                   if o == "BRA" and t is not None and a < t <= addr)
        out.append(dict(start=hex(tgt), end=hex(addr), instructions=len(body), MMA=mma, MUFU=n("MUFU"),
                        LDL_STL=n("LDL", "STL"), global_loads=n("LDG", "LDGSTS"), F64=n("DADD", "DMUL", "DFMA"),
                        skippable=skip))
        if ops:
            from collections import Counter

            out[-1]["top_ops"] = Counter(o for _, o, _ in body).most_common(ops)
    return out


def hot_loop(sass: str) -> dict:
    """Of ``loops``, the one with the most matrix instructions, the innermost (shortest) among
    equals: where a kernel's time goes. Its counts as ``loop_*``; empty if no loop has any."""
    found = loops(sass)
    if not found:
        return {}
    best = max(found, key=lambda lp: (lp["MMA"], -lp["instructions"]))
    return {f"loop_{k}": best[k] for k in ("instructions", "MMA", "LDL_STL", "MUFU", "global_loads", "F64")}


def report(built, label: str = "", ops: int = 0) -> list[dict]:
    rows = []
    for name, k in built:
        if "sass" not in k.asm or not k.asm["sass"]:
            try:
                k.asm["sass"] = _sass(k)
            except (OSError, subprocess.CalledProcessError):
                k.asm["sass"] = ""
        rows.append(dict(label=label, kernel=name, **resources(k), **hot_loop(k.asm["sass"]),
                         loops=loops(k.asm["sass"], ops)))
    return rows


def _print(rows: list[dict]) -> None:
    cols = ["label", "kernel", "regs", "spill_store_bytes", "spill_load_bytes", "shared_bytes", "warps", "stages",
            "HGMMA", "HMMA", "LDL", "STL", "instructions", "loop_instructions", "loop_MMA", "loop_LDL_STL",
            "loop_MUFU", "loop_global_loads", "loop_F64"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c)) for c in cols), flush=True)


def _inputs(S: int, Hq: int, Hkv: int, D: int, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B = 1
    q = torch.randn(B, Hq, S, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    do = torch.randn(B, Hq, S, D, generator=g).to(dtype)
    u = torch.randn(B, Hkv, S, generator=g)
    return q, k, v, do, u


def build_slots(configs: list[str], S: int, Hkv: int, variants: list[str], ops: int = 0) -> list[dict]:
    """The slot sweep (kernels/slots.py) at rows:slots:warps:stages configs, as gpu_slots.py
    times them; ``variants``: module[+FLAG=1...] as there."""
    import importlib

    from sparsek_ops.selection import fractional_ranges, select

    Hq, D, topk, window = 16, 128, 1024, 1024
    R, G = Hkv, Hq // Hkv
    q, k, v, do, u = _inputs(S, Hq, Hkv, D)
    lse = torch.randn(1, Hq, S) + 8
    shift = torch.randn(1, Hq, S) * 0.01
    sel = select(u.double(), topk, window, 64, fractional=False)
    tau = sel.tau.contiguous()  # [R, S]
    evict = sel.evict.clamp_max(S).to(torch.int32).contiguous()
    u64 = u.reshape(R, S).double().contiguous()
    f_lo, f_hi = fractional_ranges(tau, u64, window)
    frac = torch.stack([f_lo, f_hi], -1).to(torch.int32).contiguous()
    rows = []
    for variant in variants:
        name, *flags = variant.split("+")
        mod = importlib.import_module(name)
        extra = {f.split("=")[0]: bool(int(f.split("=")[1])) for f in flags}
        for cfg in configs:
            bm, bs, warps, stages, *cap = (int(x) for x in cfg.split(":"))
            mod.SLOTS_PER_TILE, mod.SWEEP_WARPS, mod.SWEEP_STAGES = bs, warps, stages
            mod.SWEEP_MAXNREG = cap[0] if cap else None
            meta = dict(G=G, D=D, DV_=D, BD=D, BDV=D, BM=max(bm, G), PRECISION="tf32", num_stages=stages, **extra)
            dk = torch.zeros(R, S, D)
            dv = torch.zeros(R, S, D)
            du = torch.zeros(R, S, dtype=torch.float64)
            with compile_only() as built:
                mod.add_selected_grads(q, k, v, do, lse, shift, u64, tau, evict, frac, dk, dv, du,
                                       topk, window, D ** -0.5, meta)
            rows += report([b for b in built if b[0] == "_bwd_slot_sweep"][-1:], f"{variant} {cfg}", ops)
    return rows


def build_step(S: int, Hkv: int, ops: int = 0) -> list[dict]:
    """Every kernel of one forward and backward through the Triton backend at the standard
    workload's tile choices (bf16, Hq 16, D 128, topk = window = 1024), the selection on the
    host. Each kernel once, as first built."""
    import dataclasses

    from sparsek_ops.kernels import backward as kb
    from sparsek_ops.kernels import forward as kf
    from sparsek_ops.kernels import selection as ks

    Hq, D, topk, window = 16, 128, 1024, 1024
    q, k, v, do, u = _inputs(S, Hq, Hkv, D)
    torch_select = ks.select_for

    def gpu_like(*args, **kwargs):
        # the GPU selection's dtypes (int32 evict and lists), which the kernels are built for
        sel = torch_select(*args, **kwargs)
        return dataclasses.replace(sel, evict=sel.evict.to(torch.int32), block_index=sel.block_index.to(torch.int32))

    # forward and backward each imported select_for by name
    kf.select_for = kb.select_for = gpu_like
    try:
        with compile_only() as built:
            out, lse = kf.forward(q, k, v, u, topk, window, D ** -0.5)
            kb.backward(do, None, q, k, v, u, out, lse, topk, window, D ** -0.5)
    finally:
        kf.select_for = kb.select_for = torch_select
    seen, first = set(), []
    for name, k_ in built:
        if name not in seen:
            seen.add(name)
            first.append((name, k_))
    return report(first, f"S={S} Hkv={Hkv}", ops)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["slots", "step"])
    ap.add_argument("--configs", nargs="+", default=["64:32:4:2"], help="slots: rows:slots:warps:stages[:maxnreg]")
    ap.add_argument("--variants", nargs="+", default=["sparsek_ops.kernels.slots"])
    ap.add_argument("--S", type=int, default=4096, help="sequence length (only its divisibility reaches the build)")
    ap.add_argument("--Hkv", type=int, default=16)
    ap.add_argument("--loops", action="store_true", help="also list every loop with matrix instructions")
    ap.add_argument("--ops", type=int, default=0, help="with --loops: each loop's N most frequent opcodes")
    a = ap.parse_args()
    print(f"triton {triton.__version__}, target sm_{HOPPER[0]}", flush=True)
    if a.what == "slots":
        rows = build_slots(a.configs, a.S, a.Hkv, a.variants, a.ops)
    else:
        rows = build_step(a.S, a.Hkv, a.ops)
    _print(rows)
    if a.loops:
        for r in rows:
            for lp in r["loops"]:
                print(r["label"], r["kernel"], lp)


if __name__ == "__main__":
    main()
