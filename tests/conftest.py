import os

import torch
from hypothesis import HealthCheck, settings

# CI machines have 2 cores: keep the example counts moderate and deadlines off (the dense
# reference is slow by design). HYPOTHESIS_PROFILE=thorough for a longer local fuzz.
settings.register_profile(
    "default", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))

# Without a GPU, the Triton kernels run on CPU tensors in Triton's interpreter. This must be
# set before sparsek_ops (and so its kernels) is imported: conftest runs before the tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
