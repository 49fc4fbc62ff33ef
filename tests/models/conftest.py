"""Model tests run torch on one thread: their tensors are tiny, and on a 2-core machine a second intra-op thread only
adds synchronisation (measured: a small LSTM step 0.36 s with two threads under load vs 1.5 ms with one)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
