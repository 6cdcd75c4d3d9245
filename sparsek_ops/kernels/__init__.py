"""Triton kernels of SPARSEK attention (backend ``"triton"``).

``forward.py``: the forward (gather list, then window span, one online softmax).
``backward.py``: the backward (dq and the score gradient per query block; dk, dv per key block,
with atomics for the selected pairs unless deterministic algorithms are enabled).
``common.py``: the Triton math both share (tile layout, masks, weights).

Run on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``
set before this package is imported).
"""
