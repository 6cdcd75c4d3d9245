"""The README's main job runs end to end with a tiny budget and writes its table, plots and JSON."""

import json
import re

from sparsek_ops import demo


def test_demo_runs_and_writes_everything(tmp_path, capsys):
    result = demo.main(["--steps", "3", "--seq", "64", "--batch", "2", "--recall-steps", "2", "--recall-batch", "4", "--eval-every", "2",
                        "--eval-batches", "1", "--corpus-mb", "0.5", "--topk", "8", "--window", "8",
                        "--layers", "1", "--d-model", "32", "--sample-bytes", "40", "--sample-prompt", "30",
                        "--device", "cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert result["op_check_max_abs_error"] < 1e-10
    for name in ("results.json", "loss_curves.png", "selection.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["kind"] for r in saved["runs"]] == ["full", "window", "sparsek"]
    for r in saved["runs"]:
        assert r["val_loss"] > 0 and r["tokens_per_s"] > 0 and r["params"] > 0
        assert len(r["curve"]["train"]) == 3 and r["curve"]["val_step"] == [2, 3]
    caches = {r["kind"]: r["sample"]["cache_bytes"] for r in saved["runs"]}
    for r in saved["runs"]:  # each trained model generated its sample through its caches
        assert r["sample"]["bytes"] == 40 and len(r["sample"]["prompt"]) > 0 and r["sample"]["tokens_per_s"] > 0
        assert f"{r['kind']}: 40 bytes generated" in out
    assert caches["window"] < caches["sparsek"]  # window: 8 pairs per head; sparsek: 8 + 8 and scores
    assert [r["kind"] for r in saved["recall"]] == ["full", "window", "sparsek"]
    assert saved["corpus"]["files_train"] > 0 and saved["corpus"]["files_val"] > 0
    assert re.search(r"^\| sparsek \| [\d,]+ \| \d+\.\d{4} \|", out, re.M)
    assert "recall accuracy" in out
    for r in saved["recall"]:
        assert 0 <= r["accuracy"] <= 1 and r["answers"] == demo.RECALL_EVAL * demo.RECALL_PAIRS
        assert r["distance_min"] > 8  # beyond the window


def test_recall_answers_follow_their_pairs_and_reach_past_topk_plus_window():
    """Every question's answer is the value of the one earlier pair with its key, the distances
    are what recall_batch reports, all beyond the window, and the default shape puts answers on
    both sides of topk + window."""
    import argparse

    import torch

    args = argparse.Namespace(topk=64, window=64)
    shape = demo.recall_shape(args)
    tokens, where, dist = demo.recall_batch(16, torch.Generator().manual_seed(0), **shape)
    P = shape["pairs"]
    for row, pos, d in zip(tokens, where, dist):
        assert sorted(row[p - 1].item() for p in pos) == sorted(row[i].item() for i in range(0, 3 * P, 3))
        for p, dd in zip(pos.tolist(), d.tolist()):
            key = row[p - 1].item()
            first = [i for i in range(0, 3 * P, 3) if row[i].item() == key]
            assert len(first) == 1 and row[first[0] + 1] == row[p] and p - (first[0] + 1) == dd
    assert dist.min() > args.window
    assert (dist <= args.topk + args.window).any() and (dist > args.topk + args.window).any()
