import glob
import os
import sys

import pytest
import torch

# `python -m pytest` from the repository root puts the root first on sys.path, where the
# package's source tree shadows an installed (non-editable) build of it. Where the source tree
# holds no build, the tests import the installed package instead.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not glob.glob(os.path.join(_ROOT, "fused_dropout", "_C.*")):
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _ROOT]

import fused_dropout  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def cuda_usable() -> bool:
    return torch.cuda.is_available() and fused_dropout.has_cuda_kernels()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU and a build with the CUDA kernels")
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "cuda" in item.keywords and not cuda_usable():
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _restore_rng_state():
    """Tests may reseed; leave every generator as it was."""
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    yield
    torch.set_rng_state(cpu_state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)
