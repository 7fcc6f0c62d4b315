"""Test-wide settings: one torch thread per process.

Tests run the ClientApp in-process next to the server; more intra-op threads than cores
(2 here) only oversubscribe them and make tiny training steps many times slower.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
