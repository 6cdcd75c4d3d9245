"""sparsek_ops: SPARSEK attention for PyTorch (DESIGN.md).

Data path: scores -> ``projection`` (the SPARSEK operator) -> ``selection`` (tau, eviction
indices, gather lists) -> kernels (``cpu`` in PyTorch, ``kernels/`` in Triton) -> ops
(``library``) -> ``api`` -> ``nn.SparseKAttention`` (the layer, with its scoring network) ->
``models.GPT`` (a small GPT whose attention kind is an argument).
``reference`` is the dense float64 statement of the contract that everything is tested against.
"""

from . import backends, library, reference, selection  # noqa: F401  (library registers the ops)
from .api import sparsek_attention, sparsek_mask
from .nn import SparseKAttention


library._lowerings(if_inductor_loaded=True)  # else at the op's first trace

__all__ = ["SparseKAttention", "sparsek_attention", "sparsek_mask", "backends", "reference", "selection"]
