"""Triton kernels of SPARSEK attention (backend ``"triton"``).

Run on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``
set before this package is imported). Only the forward exists so far; the backend's backward
is the PyTorch one (``cpu.backward``) until the Triton backward lands.
"""
