"""Shared test set-up.

* Triton kernels run on CPU tensors under the interpreter, which must be switched on before
  triton is first imported; on machines with a GPU the real kernels run instead.
* Hypothesis: no per-example deadline (the machine is shared and timings are noisy), and a
  derandomized profile on CI so a red run reproduces.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", deadline=None, max_examples=60, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else "default")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def single_thread():
    """Tiny-tensor test modules run on one thread: OpenMP barriers cost more than they save there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
