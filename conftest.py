"""Shared by tests/ and bench/: tests marked ``gpu`` are skipped, visibly, where there is no CUDA
GPU (bench/gpu_run.sh runs them on the lent GPU machine)."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run bench/gpu_run.sh on the lent GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
