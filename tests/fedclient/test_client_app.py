"""The ClientApp's process settings."""

import torch

from fedclient.device import set_torch_threads


def test_torch_threads_default_to_one_in_simulation_and_torch_default_on_devices():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        set_torch_threads(0, simulated=False)
        assert torch.get_num_threads() == 2
        set_torch_threads(0, simulated=True)
        assert torch.get_num_threads() == 1
        set_torch_threads(3, simulated=True)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
