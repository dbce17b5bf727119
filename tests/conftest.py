"""Test setup shared by every test file.

Without a GPU, Triton kernels run on the CPU interpreter, which must be switched on before
triton is first imported; torch does not import triton, so setting it here is in time.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests use tiny models, which gain nothing from intra-op threads and lose much when
# the cores are busy (seen: 10x slower with 2 threads on a loaded 2-core machine).
torch.set_num_threads(1)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test: fresh random inputs, stable reruns."""
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
    yield
