"""The private Inductor APIs the lowering uses, in one place, for torch 2.11 to 2.14.

Inductor's internals move between releases; everything version-dependent goes through here, so
that the lowering itself reads as if there were one torch. Each shim names what moved.
Nothing here is imported before ``register()`` runs (importing Inductor costs seconds).
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def inductor_modules():
    """(lowering, select_algorithm, ir, virtualized.V, config) of the installed Inductor."""
    from torch._inductor import config, ir, lowering, select_algorithm
    from torch._inductor.virtualized import V

    return lowering, select_algorithm, ir, V, config


def install_lowering(op: torch._ops.OpOverload, fn: Callable[..., Any], fallback: Callable[..., Any]) -> str:
    """Make ``fn`` Inductor's lowering of ``op``; returns how ("user_lowerings" or
    "register_lowering").

    torch 2.13 and later have a per-op user-lowering hook (``lowering.user_lowerings``): a
    lowering registered there may return None, and Inductor then lowers the op as it would have
    (for a custom op: an extern call with the op's layout constraints). Older releases only have
    ``register_lowering``, which replaces the default; there ``fn`` returning None means
    ``fallback`` (an extern call of the op itself) is used instead."""
    lowering = inductor_modules()[0]
    hooks = getattr(lowering, "user_lowerings", None)
    if isinstance(hooks, dict):
        hooks[op] = fn
        return "user_lowerings"

    def lower_or_fall_back(*args, **kwargs):
        out = fn(*args, **kwargs)
        return fallback(*args, **kwargs) if out is None else out

    lowering.register_lowering(op, type_promotion_kind=None)(lower_or_fall_back)
    return "register_lowering"


def extern_call(op: torch._ops.OpOverload) -> Callable[..., Any]:
    """A lowering that runs ``op`` itself as an extern kernel (Inductor's fallback handler)."""
    lowering = inductor_modules()[0]
    return lowering.fallback_handler(op, add_to_fallback_set=False)


def static_int(expr) -> int:
    """An int for a size Inductor must treat as static (head dims, heads), guarded: a graph
    compiled for one value is not reused for another. (``guard_int`` since torch 2.6;
    ``evaluate_static_shape`` before.)"""
    V = inductor_modules()[3]
    sizevars = V.graph.sizevars
    fn = getattr(sizevars, "guard_int", None) or sizevars.evaluate_static_shape
    return int(fn(expr))


def hint(expr) -> int:
    """The example value of a possibly symbolic size, for autotuning inputs, without a guard
    (torch 2.13 renamed ``size_hint`` to ``optimization_hint``)."""
    V = inductor_modules()[3]
    sizevars = V.graph.sizevars
    fn = getattr(sizevars, "optimization_hint", None) or sizevars.size_hint
    return int(fn(expr))


def example_layout(node) -> tuple[list[int], list[int]]:
    """The example sizes and strides of an IR node (``hint`` of each), for autotuning inputs."""
    return [hint(s) for s in node.get_size()], [hint(s) for s in node.get_stride()]


def example_like(node, value: torch.Tensor) -> torch.Tensor:
    """``value`` laid out as ``node``'s example (its sizes and strides): an autotuning input."""
    size, stride = example_layout(node)
    return torch.empty_strided(size, stride, dtype=value.dtype, device=value.device).copy_(value)


def statically_true(cond) -> bool:
    V = inductor_modules()[3]
    return bool(V.graph.sizevars.statically_known_true(cond))


def triton_template(name: str, grid, source: str):
    """A ``TritonTemplate`` named ``name``, or the one already made under that name (Inductor
    keeps a registry of names and asserts that each is new: a second ``register()``, or a
    module reload in a test, must not trip it). Layouts are frozen when the template reads
    strides (``always_freeze_layout``, a keyword newer than some releases)."""
    select_algorithm = inductor_modules()[1]
    TritonTemplate = select_algorithm.TritonTemplate
    existing = TritonTemplate.all_templates.get(name)
    if existing is not None:
        return existing
    try:
        return TritonTemplate(name=name, grid=grid, source=source, always_freeze_layout=True)
    except TypeError:
        return TritonTemplate(name=name, grid=grid, source=source)


def symbolic_grid(fn):
    """``SymbolicGridFn(fn)``: a grid that takes ints or sympy sizes (``cdiv`` keyword)."""
    return inductor_modules()[1].SymbolicGridFn(fn)


def autotune(name: str, choices: list, input_nodes: list, layout, input_gen_fns: dict):
    """Inductor's choice among ``choices`` (benchmarked when there are several); the chosen
    node. (torch 2.13 returns (node, extra); older releases the node alone.)"""
    select_algorithm = inductor_modules()[1]
    out = select_algorithm.autotune_select_algorithm(name, choices, input_nodes, layout,
                                                     input_gen_fns=input_gen_fns)
    return out[0] if isinstance(out, tuple) else out


def realize(x):
    """x as a realized buffer the template can read with strides."""
    ir = inductor_modules()[2]
    return ir.ExternKernel.realize_input(x)


def contiguous(x):
    """x as a contiguous realized buffer (the kernels index lse and shift as [B, Hq, S])."""
    ir = inductor_modules()[2]
    return ir.ExternKernel.require_contiguous(x)
