"""Test-wide settings: offline Hugging Face, seeded and single-threaded torch, quiet progress bars, and the C++
kernel built in a folder of the system's temp directory (not the user's ~/.cache) unless TORCH_EXTENSIONS_DIR is set."""

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # never the network, whatever the caller's environment says
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / "dpo_llama_test_extensions"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Runs each module's tests with one torch thread, then restores the previous count.

    The test models are tiny: a second thread buys nothing, and when other processes keep the cores busy
    OpenMP's waiting threads make each small matmul hundreds of times slower. Tests about threading set
    their thread counts themselves.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
