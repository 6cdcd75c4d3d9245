"""Inductor lowering of ``sparsek::attention_backward``.

The eager Triton backward's stages (``sparsek_ops.kernels.backward.backward``), in the same
order, on the same Triton code::

    sparsek::backward_prep (extern)      shift, u64 and the selection (the forward's, when a
                                          compiled training forward left it), F's ranges
    "sparsek_window_keys" template       the window part of dk (output), dv (mutated input)
    sparsek::backward_selected (extern)  the selected pairs' dk, dv (added in place) and du's
                                          first term, by slots (``kernels/slots.py``)
    "sparsek_query" template             dq (output) and the c_i sums (mutated input)
    sparsek::backward_du (extern)        du
    Inductor pointwise                   the casts of dk, dv, du to the inputs' dtypes (fused
                                          into the template's store when there is no selected
                                          part to add), any consumer of dq into its template

The slot sweep stays an extern kernel: its launches (entry blocks, lanes, sweep, carries) and
their scratch buffers are sized by the selection on the host side. ``lower_attention_backward``
returns None where the templates cannot serve (as the forward's lowering, ``attention.py``).
"""

from __future__ import annotations

import sympy
import torch

from . import compat, templates
from .attention import _fall_back, _serves, choose, configs


@compat.symbolic_grid
def _window_grid(S, Hkv, B, meta, *, cdiv):
    return (cdiv(S, meta["BN"]), Hkv, B)


@compat.symbolic_grid
def _query_grid(S, Hkv, B, meta, *, cdiv):
    return (cdiv(S, meta["BM"] // meta["G"]), Hkv, B)


_TEMPLATES: dict = {}


def _template(kind: str):
    if kind not in _TEMPLATES:
        grid, source = {"window_keys": (_window_grid, templates.WINDOW_KEYS),
                        "query": (_query_grid, templates.QUERY)}[kind]
        _TEMPLATES[kind] = compat.triton_template(f"sparsek_{kind}_{templates.KERNEL_VERSION}", grid, source)
    return _TEMPLATES[kind]


def lower_attention_backward(grad_out, grad_lse, q, k, v, u, out, lse, topk, window, scale, backend="auto"):
    """The lowering (IR nodes for tensors); None: not served here."""
    import sparsek_ops.kernels.backward_ops  # noqa: F401  (registers the extern stages)
    from sparsek_ops.kernels import backward as eager

    lowering, _, ir, V, config = compat.inductor_modules()
    why = _serves(q, topk, window, scale, backend)
    if why is not None:
        return _fall_back(why, "sparsek::attention_backward")
    B, Hq, S, D = q.get_size()
    Hkv, Dv = k.get_size()[1], v.get_size()[3]
    if compat.statically_true(sympy.Eq(S, 0)):
        return _fall_back("empty sequence", "sparsek::attention_backward")
    D, Dv, Hq, Hkv = (compat.static_int(x) for x in (D, Dv, Hq, Hkv))
    G = Hq // Hkv
    device, dtype = q.get_device(), q.get_dtype()
    pl = eager.plan(D, Dv, dtype, G)
    has_sel, has_win = topk > 0, window > 0
    extern = compat.extern_call

    grad_out = lowering.to_dtype(grad_out, dtype)  # the dots want one dtype
    prep = extern(torch.ops.sparsek.backward_prep.default)(grad_out, grad_lse, out, u, topk, window, pl.QMQ)
    shift, u64, tau, frac, evict, lists, counts = prep
    lse32 = compat.contiguous(lowering.to_dtype(lse, torch.float32))
    q, k, v, grad_out, shift, u64, tau, frac, evict, lists, counts = (
        compat.realize(x) for x in (q, k, v, grad_out, shift, u64, tau, frac, evict, lists, counts))
    common = dict(G=G, D=D, DV_=Dv, BD=pl.BD, BDV=pl.BDV, WINDOW=window, SCALE=float(scale),
                  PRECISION=repr(pl.meta["PRECISION"]))
    tune = bool(config.max_autotune)

    acc = torch.float32 if has_sel else None  # the selected parts are added to float32 sums
    dk_size, dv_size = [B, Hkv, S, D], [B, Hkv, S, Dv]
    if has_win:
        dk_layout = ir.FixedLayout(device, acc or k.get_dtype(), dk_size,
                                   stride=ir.FlexibleLayout.contiguous_strides(dk_size))
        dv = lowering.empty_strided(dv_size, None, dtype=acc or v.get_dtype(), device=device)
        choices = configs((pl.BN, 4, pl.meta["num_stages"]), tune, ((32, 4, 2), (64, 4, 3), (64, 8, 2)))
        dk = choose(_template("window_keys"), "sparsek_window_keys", [q, k, v, grad_out, lse32, shift, dv], dk_layout,
                    [dv], [S, Hkv, B], choices, dict(common, BM=pl.meta["BM"]))
    else:
        dk = _zeros(lowering, dk_size, torch.float32, device)
        dv = _zeros(lowering, dv_size, torch.float32, device)
    if has_sel:
        # dk, dv stay the TensorBoxes the lowering returns (cast below); the extern call realizes
        # their buffers and adds into them, and Inductor orders every later read after it.
        du1 = extern(torch.ops.sparsek.backward_selected.default)(
            dk, dv, q, k, v, grad_out, lse32, shift, u64, tau, evict, frac, topk, window, float(scale))
        crow = lowering.empty_strided([B * Hkv, S, G], None, dtype=torch.float64, device=device)
    else:
        crow = lowering.empty([1], dtype=torch.float64, device=device)

    dq_size = [B, Hq, S, D]
    dq_layout = ir.FixedLayout(device, dtype, dq_size, stride=ir.FlexibleLayout.contiguous_strides(dq_size))
    choices = configs((pl.QN, pl.q_warps, pl.q_stages), tune, ((32, 8, 2), (64, 8, 3), (64, 8, 2)))
    inputs = [q, k, v, grad_out, lse32, shift, u64, tau, evict, frac, lists, counts, crow]
    dq = choose(_template("query"), "sparsek_query", inputs, dq_layout, [crow], [S, Hkv, B], choices,
                dict(common, BM=pl.QM, HAS_SEL=has_sel, HAS_WIN=has_win),
                _query_autotune_inputs(grad_out, out, u, topk, window, pl.QMQ) if tune and has_sel else None)

    if has_sel:
        du = extern(torch.ops.sparsek.backward_du.default)(du1, crow, frac)
        du = lowering.to_dtype(du, u.get_dtype())
        du = lowering.lowerings[torch.ops.aten.reshape.default](du, list(u.get_size()))
    else:
        du = _zeros(lowering, list(u.get_size()), u.get_dtype(), device)
    dk = lowering.to_dtype(dk, k.get_dtype())
    dv = lowering.to_dtype(dv, v.get_dtype())
    return dq, dk, dv, du


def _zeros(lowering, size, dtype, device):
    return lowering.lowerings[torch.ops.aten.full.default](size, 0, dtype=dtype, device=device)


def _query_autotune_inputs(grad_out, out, u, topk, window, block_q):
    """``input_gen_fns`` for the query template under max_autotune: u64 and the selection from
    ``backward_prep`` on random inputs of the same shapes (random gather lists would be
    meaningless; zeros would time an empty loop)."""
    made: dict = {}

    def prep():
        if not made:
            gen = torch.Generator(device=u.get_device()).manual_seed(0)

            def rand(node):
                size, _ = compat.example_layout(node)
                return torch.randn(size, generator=gen, device=node.get_device()).to(node.get_dtype())

            made["all"] = torch.ops.sparsek.backward_prep(rand(grad_out), None, rand(out), rand(u), topk, window,
                                                          block_q)
        return made["all"]

    def gen(i):
        return lambda node: compat.example_like(node, prep()[i])

    # inputs[6:12]: u64, tau, evict, frac, lists, counts = prep()[1], [2], [4], [3], [5], [6]
    return {6: gen(1), 7: gen(2), 8: gen(4), 9: gen(3), 10: gen(5), 11: gen(6)}
