"""Test setup shared by every test file.

Without a GPU, Triton kernels run on the CPU interpreter, which must be switched on before
triton is first imported; torch does not import triton, so setting it here is in time. An
explicit TRITON_INTERPRET (e.g. 0, as CI sets once to prove the suite on a GPU machine) is kept.

Two markers say what a test needs; each skips with its reason when that is missing:
- `requires_cuda` (marker `gpu`): a CUDA device. `pytest -m gpu` selects exactly these.
- `requires_interpreter` (marker `interpreter`): the Triton CPU interpreter, TRITON_INTERPRET=1.
  Every test that runs a Triton kernel on CPU tensors carries it; on a GPU machine they skip.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests use tiny models, which gain nothing from intra-op threads and lose much when
# the cores are busy (seen: 10x slower with 2 threads on a loaded 2-core machine).
torch.set_num_threads(1)

requires_cuda = pytest.mark.gpu
requires_interpreter = pytest.mark.interpreter


def interpreter_on() -> bool:
    # the same test as the dispatcher's (dcvit_engine/ops/dispatch.py), so a test runs exactly
    # when the triton backend accepts CPU tensors
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cpu_backends(*names: str) -> list:
    """The backends among `names` that take CPU tensors in this run: triton only under the interpreter
    (for loops over backends inside one test; a parametrized test marks its triton case instead)."""
    return [name for name in names if name != "triton" or interpreter_on()]


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    no_interpreter = pytest.mark.skip(
        reason="needs the Triton CPU interpreter: run with TRITON_INTERPRET=1 set before Python starts")
    cuda = torch.cuda.is_available()
    interpreter = interpreter_on()
    for item in items:
        if item.get_closest_marker("gpu") and not cuda:
            item.add_marker(no_cuda)
        if item.get_closest_marker("interpreter") and not interpreter:
            item.add_marker(no_interpreter)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test: fresh random inputs, stable reruns."""
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
    yield
