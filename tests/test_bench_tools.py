"""The benchmarks' own machinery (bench/): the check each benchmark passes before it is timed
must catch a wrong result, the Flex top-k baseline must attend what its docstring says, and the
GPU report must write its table and plot."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import gpu_bench  # noqa: E402
from workloads import Workload, check_prefix  # noqa: E402


def test_check_prefix_passes_the_op_and_catches_a_wrong_output_or_gradient():
    w = Workload(1, 4, 2, 700, 32, 64, 64, torch.float32, "cpu")
    q, k, v, u, do = w.inputs(grad=True)
    out = w.run(q, k, v, u)
    out.backward(do)
    check_prefix(w, q, k, v, u, do, out, q.grad)
    with pytest.raises(AssertionError, match="out of the first"):
        check_prefix(w, q, k, v, u, do, out * 1.001, q.grad)
    bad_dq = q.grad.clone()
    bad_dq[:, :, 300] += 0.1  # one row inside the checked prefix (2 * (64 + 64) + 64 = 320)
    with pytest.raises(AssertionError, match="dq of the first"):
        check_prefix(w, q, k, v, u, do, out, bad_dq)


@pytest.mark.parametrize("S,keys", [(1088, 512), (2048, 1024), (256, 2048)])
def test_flex_topk_mask_attends_own_block_and_the_right_number_of_earlier_blocks(S, keys):
    dense = gpu_bench.flex_topk_mask(S, keys, "cpu").to_dense()[0, 0]
    nb = dense.shape[0]
    extra = keys // gpu_bench.FLEX_BLOCK - 1
    for i in range(nb):
        assert dense[i, i] == 1 and dense[i, i + 1:].sum() == 0  # own block, nothing later
        assert dense[i, :i].sum() == min(i, extra)  # every earlier block while fewer than extra
    if nb > extra + 1:  # some rows choose among more earlier blocks than they take: by the seed
        assert not torch.equal(dense, gpu_bench.flex_topk_mask(S, keys, "cpu", seed=1).to_dense()[0, 0])


def test_report_writes_a_table_and_a_plot(tmp_path):
    rows = []
    for S in (4096, 8192):
        for Hkv in (16, 2):
            r = {"S": S, "B": 32768 // S, "Hkv": Hkv, "topk": 1024, "window": 1024, "selection_ms": 1.0}
            for n, m in enumerate(gpu_bench.METHODS):
                for part in ("fwd", "bwd", "fwdbwd"):
                    r[f"{m}_{part}_ms"] = 1.0 + n
                    r[f"{m}_{part}_tflops"] = 100.0 * (n + 1)
            rows.append(r)
    lines = gpu_bench.table(rows, "header")
    assert lines[0] == "header" and len(lines) == 4 + len(rows)
    assert lines[-1].startswith("| 8192 | 2 | 1 / 1 / 1 | 1 | 2 / 2 |") and "| 2.00x / 2.00x |" in lines[-1]
    gpu_bench.plot(rows, tmp_path / "p.png", "title")
    assert (tmp_path / "p.png").stat().st_size > 10_000


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/               @P0 BRA 0x50 ;
        /*0030*/                   MUFU.EX2 R2, R2 ;
        /*0040*/                   FMUL R2, R2, R3 ;
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, R120, gdesc[UR16], R24 ;
        /*0060*/               @P1 BRA 0x10 ;
        /*0070*/                   EXIT ;
"""


def test_sm90_loop_report_counts_a_loop_and_its_skippable_branch():
    import sm90_build

    (lp,) = sm90_build.loops(SASS)
    assert (lp["start"], lp["end"], lp["instructions"], lp["MMA"], lp["MUFU"]) == ("0x10", "0x60", 6, 2, 1)
    assert lp["skippable"] == 2  # the @P0 branch jumps over the MUFU and the FMUL
    assert sm90_build.hot_loop(SASS)["loop_instructions"] == 6


def test_sm90_build_compiles_the_slot_sweep_without_a_gpu():
    """bench/sm90_build.py builds a kernel for the H100 with this machine's Triton (no device,
    no interpreter) and reads its registers and matrix instructions back."""
    import subprocess

    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root
    cmd = [sys.executable, os.path.join(root, "bench", "sm90_build.py"), "slots", "--S", "3072", "--Hkv", "2",
           "--configs", "64:32:4:2"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    row = run.stdout.strip().splitlines()[-1].split(" | ")
    header = run.stdout.strip().splitlines()[-2].split(" | ")
    got = dict(zip(header, row))
    assert got["kernel"] == "_bwd_slot_sweep" and 32 < int(got["regs"]) <= 255
    assert int(got["HMMA"]) + int(got["HGMMA"]) > 0 and int(got["loop_MMA"]) > 0
