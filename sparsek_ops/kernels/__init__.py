"""Triton kernels of SPARSEK attention (backend ``"triton"``, the ``"auto"`` choice on CUDA).

``selection.py``: the selection on the GPU (tau, eviction indices, gather lists of every query
block; the same results as ``sparsek_ops/selection.py``, with no host synchronisation).
``forward.py``: the forward (gather list, then window span, one online softmax).
``backward.py``: the backward (dq and the score gradient per query block; the window keys' dk,
dv per key block), with ``slots.py``: the selected pairs' dk, dv and du swept by slots (DESIGN
fact 6). No atomics: repeated runs are bitwise identical.
``selection_cache.py``: the forward's selection, kept for the backward of the same call.
``common.py``: the Triton math both share (tile layout, masks, weights).

Run on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``
set before this package is imported).
"""
