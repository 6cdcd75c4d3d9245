"""The README's main job runs end to end (tiny sizes) and prints its check and its timing."""

import re

from sparsek_ops import demo


def test_demo_runs_and_reports(capsys):
    demo.main(["--seq", "300", "--topk", "16", "--window", "8", "--heads", "2", "--dim", "16", "--repeats", "1"])
    out = capsys.readouterr().out
    errors = [float(x) for x in re.findall(r"^\s+(?:out|dq|dk|dv|du)\s+(\S+)$", out, re.M)]
    assert len(errors) == 5 and max(errors) < 1e-10
    assert "SDPA causal" in out and re.search(r"speed-up: \d+\.\d+x", out)
