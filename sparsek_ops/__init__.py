"""sparsek_ops: SPARSEK attention for PyTorch (DESIGN.md).

Data path: scores -> ``projection`` (the SPARSEK operator) -> ``selection`` (tau, eviction
indices, gather lists) -> kernels (``cpu``; Triton to come) -> ops (``library``) -> ``api``.
``reference`` is the dense float64 statement of the contract that everything is tested against.
"""

from . import backends, library, reference, selection  # noqa: F401  (library registers the ops)
from .api import sparsek_attention, sparsek_mask

__all__ = ["sparsek_attention", "sparsek_mask", "backends", "reference", "selection"]
