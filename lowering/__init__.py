"""sparsek_lowering: the Inductor lowering of ``sparsek::attention`` (DESIGN.md section 4).

Not built yet: it is the subject of its own issue. Until it lands, ``torch.compile`` keeps the
``sparsek::`` ops as opaque custom-op calls (their fake kernels give Inductor the shapes),
which is correct on every device and causes no graph break.
"""
