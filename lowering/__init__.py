"""sparsek_lowering: the Inductor lowering of ``sparsek::attention`` (DESIGN.md section 4).

Under ``torch.compile`` on CUDA, Inductor lowers the op to the selection (an extern call of
``sparsek::select``) and the attention kernel as a ``TritonTemplate`` it autotunes and fuses
pointwise epilogues into (``attention.py``; the template glue is in ``templates.py``, the math is
the eager kernels' own Triton code). Where the template cannot serve (CPU tensors, float64,
``backend="torch"``), the op runs as an extern call of its eager kernel, logged once per reason
on the ``sparsek_lowering`` logger. ``sparsek::attention_backward`` is lowered the same way
(``backward.py``): two templates (the window keys' dk, dv and the query kernel's dq) between
extern calls of the backward's other stages (``sparsek_ops.kernels.backward_ops``).

Registration: ``import sparsek_ops`` registers the lowerings when Inductor is already loaded,
and otherwise the first time the op is traced (its fake kernel calls ``ensure_registered``),
which is always before Inductor lowers it: importing Inductor costs about 4 s, which eager users
should not pay. ``register()`` may be called directly; it is idempotent.

Caches: the templates carry ``KERNEL_VERSION``, a hash of the Triton sources they call, so that
Inductor's template and autotuning caches key on it; the FX graph cache keys on
``torch.compiler.config.cache_key_tag``, to which registration appends ``sparsek-<version>``
(a user's own tag is kept in front).
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("sparsek_lowering")

_STATE: dict = {}  # "how": the registration mechanism, once registered


def registered() -> bool:
    """Whether the lowerings are registered in this process."""
    return "how" in _STATE


def register() -> str:
    """Register the lowerings with Inductor (importing it); returns the mechanism used
    ("user_lowerings" on torch >= 2.13, else "register_lowering"). Idempotent."""
    if registered():
        return _STATE["how"]
    import torch

    import sparsek_ops  # noqa: F401  (defines the ops)

    from . import attention, backward, compat, templates

    for op, fn in ((torch.ops.sparsek.attention.default, attention.lower_attention),
                   (torch.ops.sparsek.attention_backward.default, backward.lower_attention_backward)):
        _STATE["how"] = compat.install_lowering(op, fn, compat.extern_call(op))
    _tag_fx_graph_cache()
    log.debug("sparsek lowerings registered via %s (kernels %s)", _STATE["how"], templates.KERNEL_VERSION)
    return _STATE["how"]


def ensure_registered() -> None:
    """Register if not yet; quiet and cheap after the first call. A torch without the Inductor
    pieces the lowering needs leaves the op to run as an extern call, as before (logged)."""
    if registered() or _STATE.get("failed"):
        return
    try:
        register()
    except Exception as e:  # an unsupported torch: the op still works, unlowered
        _STATE["failed"] = repr(e)
        log.warning("sparsek lowerings not registered (the op runs as an extern call): %r", e)


def register_if_inductor_loaded() -> None:
    """``import sparsek_ops`` calls this: register now only if Inductor is already imported."""
    if "torch._inductor.lowering" in sys.modules:
        ensure_registered()


def _version_tag() -> str:
    """What registration appends to ``torch.compiler.config.cache_key_tag``."""
    from .templates import KERNEL_VERSION

    return f"sparsek-{KERNEL_VERSION}"


def _tag_fx_graph_cache() -> None:
    """Append ``sparsek-<version>`` to the FX graph cache's key tag: the cache key does not see
    lowerings, so without it a graph compiled with older sparsek kernels could be served."""
    import torch

    cfg = getattr(getattr(torch, "compiler", None), "config", None)
    if cfg is None or not hasattr(cfg, "cache_key_tag"):
        return
    mine = _version_tag()
    tag = cfg.cache_key_tag or ""
    if mine not in tag:
        cfg.cache_key_tag = f"{tag}|{mine}" if tag else mine
