"""Implementations of the attention kernels, chosen by name.

A backend is a pair of functions with the signatures of ``cpu.forward`` and ``cpu.backward``.
``sparsek::attention`` and ``sparsek::attention_backward`` look their backend up here at run
time, so a backend is an argument of the op (it travels into the backward and through
``torch.compile``), not global state.

``"auto"`` means: the fastest backend registered for the tensors' device type.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import cache, cpu


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable
    devices: tuple[str, ...] | None  # device types it runs on; None: any
    doc: str
    decode: Callable | None = None  # one decode step over a SparseKCache (cache.decode_torch's signature)


_BACKENDS: dict[str, Backend] = {}
_AUTO: dict[str, str] = {}  # device type -> backend name; missing: "torch"


def register(backend: Backend, auto_for: tuple[str, ...] = ()) -> None:
    """Add a backend; ``auto_for`` lists the device types where ``"auto"`` should pick it."""
    _BACKENDS[backend.name] = backend
    for device_type in auto_for:
        _AUTO[device_type] = backend.name


def names() -> list[str]:
    return ["auto", *_BACKENDS]


def check_name(name: str) -> None:
    if not isinstance(name, str) or name not in names():
        raise ValueError(f"backend must be one of {names()}, got {name!r}")


def resolve(name: str, device: torch.device) -> Backend:
    check_name(name)
    if name == "auto":
        name = _AUTO.get(device.type, "torch")
    backend = _BACKENDS[name]
    if backend.devices is not None and device.type not in backend.devices:
        raise ValueError(f"backend {name!r} runs on {list(backend.devices)} tensors, got {device.type} tensors")
    return backend


register(Backend("torch", cpu.forward, cpu.backward, None,
                 "PyTorch block kernels (sparsek_ops/cpu.py); any device", decode=cache.decode_torch))


def _register_triton() -> None:
    """Backend "triton": the Triton forward and backward (sparsek_ops/kernels; the backward has
    no atomics, so it is deterministic).
    CUDA tensors; CPU tensors too when TRITON_INTERPRET=1 was set before import."""
    try:
        from .kernels import backward as triton_backward
        from .kernels import decode as triton_decode
        from .kernels import forward as triton_forward
    except ImportError:  # no triton on this platform: the backend is simply not offered
        return
    devices = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
    # "auto" on CUDA: the Triton kernels (about 2x faster than SDPA causal at 32K forward, on an
    # H100, bench/NOTES.md; the PyTorch backend host-syncs on CUDA). Not in the interpreter:
    # there "auto" stays the PyTorch backend, which is far faster on CPU.
    register(Backend("triton", triton_forward.forward, triton_backward.backward, devices,
                     "Triton forward, backward and decode (sparsek_ops/kernels)", decode=triton_decode.decode),
             auto_for=("cuda",))


_register_triton()
