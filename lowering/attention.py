"""Inductor lowering of ``sparsek::attention`` (the forward).

Path of data, as in eager mode (``sparsek_ops.kernels.forward``)::

    u --(sparsek::select, an extern kernel)--> tau, evict, gather lists
      --(the "sparsek_attention" template: fwd_rows + Inductor's stores)--> out, lse

The selection stays an extern call of its own op (as FlexAttention takes its BlockMask from
outside the template): it is a sort and a handful of small Triton launches with data-dependent
work, nothing Inductor could fuse. The attention kernel is a ``TritonTemplate``: Inductor
autotunes its block sizes, warps and stages (under ``max_autotune``; otherwise it takes the eager
kernel's config) and fuses pointwise consumers of ``out`` into its store.

``lower_attention`` returns None where the template cannot serve (CPU tensors, float64, the
"torch" backend, symbolic topk, window or scale); head dims and head counts are guarded as
static sizes, the sequence length stays symbolic. The op then runs as an extern call of its
own eager implementation (``compat.install_lowering``), and ``fallbacks`` records why, once per
reason, in the log.
"""

from __future__ import annotations

import logging

import sympy
import torch

from . import compat, templates

log = logging.getLogger("sparsek_lowering")

_LOGGED: set[str] = set()
fallbacks: dict[str, int] = {}  # "op: reason" -> how many op calls fell back for it (tests read it)


def _fall_back(reason: str, op: str = "sparsek::attention"):
    key = f"{op}: {reason}"
    fallbacks[key] = fallbacks.get(key, 0) + 1
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("%s runs its eager kernel under torch.compile: %s", op, reason)
    return None


def _serves(q, topk, window, scale, backend) -> str | None:
    """Why the templates cannot serve this call, or None."""
    if backend not in ("auto", "triton"):
        return f"backend {backend!r}"
    device = q.get_device()
    if device is None or device.type != "cuda":
        return f"{getattr(device, 'type', device)} tensors (the template is CUDA only)"
    dtype = q.get_dtype()
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"{dtype} inputs"
    if not all(isinstance(x, int) for x in (topk, window)) or not isinstance(scale, float):
        return "symbolic topk, window or scale"
    return None


@compat.symbolic_grid
def _grid(S, R, meta, *, cdiv):
    return (cdiv(S, meta["BM"] // meta["G"]), R, 1)


_TEMPLATE = None


def _template():
    global _TEMPLATE
    if _TEMPLATE is None:
        _TEMPLATE = compat.triton_template(f"sparsek_attention_{templates.KERNEL_VERSION}", _grid,
                                           templates.FORWARD)
    return _TEMPLATE


def configs(base: tuple, tune: bool, extra) -> list:
    """(BN, warps, stages) choices of a template: the eager config ``base`` alone, or under
    max_autotune ``base`` then each of ``extra`` not already there."""
    out = [base]
    if tune:
        out += [c for c in extra if c not in out]
    return out


# The forward's extra choices: the neighbours that sm_90 builds found reasonable (bench/NOTES.md,
# forward configs), all at the eager config's rows (the selection's block size depends on them).
_FORWARD_EXTRA = tuple((bn, warps, stages) for bn in (32, 64) for warps in (4, 8) for stages in (2, 3))

# The template's inputs, in the order of its kernel signature (templates.FORWARD).
_INPUTS = ("Q", "K", "V", "U", "TAU", "EVICT", "LISTS", "LSE")


def choose(template, name, inputs, layout, mutated, call_sizes, configs, options, input_gen_fns=None):
    """The template's choices, one per (BN, warps, stages) of ``configs``, and Inductor's pick
    among them (benchmarked with ``input_gen_fns`` when there are several)."""
    choices: list = []
    errors = []
    for bn, warps, stages in configs:
        err = template.maybe_append_choice(
            choices, input_nodes=inputs, layout=layout, mutated_inputs=mutated, call_sizes=call_sizes,
            num_stages=stages, num_warps=warps, BN=bn, **options)
        if err is not None:
            errors.append(err)
    if not choices:
        raise RuntimeError(f"sparsek_lowering: no {name} template choice could be generated: {errors}")
    return compat.autotune(name, choices, inputs, layout, input_gen_fns or {})


def _autotune_inputs(nodes: dict, topk: int, window: int, block_m: int):
    """``input_gen_fns`` for the template's inputs: a real selection of random scores, since
    zero-filled lists would time an empty kernel. The scores are made once and shared by u's
    generator and the selection's three, so that the weights match the lists."""
    made: dict = {}

    def selection():
        if not made:
            size, _ = compat.example_layout(nodes["U"])
            gen = torch.Generator(device=nodes["U"].get_device()).manual_seed(0)
            u = torch.randn(size, generator=gen, device=nodes["U"].get_device(), dtype=nodes["U"].get_dtype())
            made["U"] = u
            if topk > 0:
                made["TAU"], made["EVICT"], made["LISTS"] = torch.ops.sparsek.select(u, topk, window, block_m, False)
        return made

    def gen(name):
        return lambda node: compat.example_like(node, selection()[name])

    names = ["U", "TAU", "EVICT", "LISTS"] if topk > 0 else ["U"]
    return {_INPUTS.index(name): gen(name) for name in names}


def lower_attention(q, k, v, u, topk, window, scale, backend="auto"):
    """The lowering (Inductor calls it with IR nodes for tensors); None: not served here."""
    from sparsek_ops.kernels import common, forward

    lowering, _, ir, V, config = compat.inductor_modules()
    why = _serves(q, topk, window, scale, backend)
    if why is not None:
        return _fall_back(why)
    device, dtype = q.get_device(), q.get_dtype()
    B, Hq, S, D = q.get_size()
    Hkv, Dv = k.get_size()[1], v.get_size()[3]
    if compat.statically_true(sympy.Eq(S, 0)):
        return _fall_back("empty sequence")
    D, Dv, Hq, Hkv = (compat.static_int(x) for x in (D, Dv, Hq, Hkv))
    G = Hq // Hkv
    cfg = forward.config(D, Dv, dtype, G)
    BM = common.rows_per_tile(cfg.block_m, G)
    BMQ = forward.block_queries(D, Dv, dtype, G, cfg)

    if topk > 0:
        # The op's own u (not a float32 copy): the selection cache keys on it, and in a training
        # graph the backward (which gets the same u) takes this selection instead of selecting
        # again, as in eager mode.
        remember = not getattr(V.graph, "is_inference", True)
        tau, evict, lists = compat.extern_call(torch.ops.sparsek.select.default)(u, topk, window, BMQ, remember)
    else:  # no selected part: HAS_SEL is off and the kernel never reads these
        tau = lowering.empty([1], dtype=torch.float64, device=device)
        evict = lowering.empty([1], dtype=torch.int32, device=device)
        lists = lowering.empty([1, 1, 0], dtype=torch.int32, device=device)
    if u.get_dtype() not in (torch.float32, torch.float64):  # the kernel reads float32 or float64
        u = lowering.to_dtype(u, torch.float32)
    q, k, v, u, tau, evict, lists = (compat.realize(x) for x in (q, k, v, u, tau, evict, lists))

    out_size = [B, Hq, S, Dv]
    layout = ir.FixedLayout(device, dtype, out_size, stride=ir.FlexibleLayout.contiguous_strides(out_size))
    lse = lowering.empty_strided([B, Hq, S], None, dtype=torch.float32, device=device)
    options = dict(
        G=G, D=D, DV=Dv, BD=common.dot_width(D), BDV=common.dot_width(Dv), BM=BM, HAS_SEL=topk > 0, U64=u.get_dtype() == torch.float64,
        NSAMP=forward.LIST_SAMPLES, LAZY=cfg.lazy_rescale, PRECISION="'ieee'", WINDOW=window,
        QSCALE=float(scale * forward.LOG2E),
    )
    inputs = [q, k, v, u, tau, evict, lists, lse]
    nodes = dict(zip(_INPUTS, inputs))
    choices = configs((cfg.block_n, cfg.num_warps, cfg.num_stages), bool(config.max_autotune), _FORWARD_EXTRA)
    out = choose(_template(), "sparsek_attention", inputs, layout, [lse], [S, B * Hkv], choices, options,
                 _autotune_inputs(nodes, topk, window, BMQ))
    return out, lse
