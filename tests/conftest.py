"""Test-wide settings: one torch thread per test.

Tests run the ClientApp in-process next to the server; more intra-op threads than cores
(2 here) only oversubscribe them and make tiny training steps many times slower. Set per
test, not per session, because code under test may change it (a ClientApp outside a
simulation takes torch's default), and no test should inherit another's setting.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
