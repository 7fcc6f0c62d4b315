"""Moving weights between NumPy and a torch model: exact, in place, any model dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedclient.training import get_params, params_delta, set_params


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_params_delta_equals_get_params_minus_reference(dtype):
    model = _model(dtype)
    reference = {k: v + np.float32(0.25) for k, v in get_params(model).items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    delta = params_delta(model, reference)
    expected = {k: v - reference[k] for k, v in get_params(model).items()}
    assert list(delta) == list(expected)  # state_dict order, buffers included
    for k, want in expected.items():
        assert delta[k].dtype == np.float32
        np.testing.assert_array_equal(delta[k], want)
        # a new array, not a view of the model's memory
        assert not np.shares_memory(delta[k], model.state_dict()[k].numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_set_params_loads_in_place_and_round_trips(dtype):
    model = _model(dtype)
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    params = {k: np.full_like(v, 2.0) for k, v in get_params(model).items()}
    set_params(model, params)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    for k, v in model.state_dict().items():
        assert v.dtype == (torch.int64 if k.endswith("num_batches_tracked") else dtype)
    for k, v in get_params(model).items():
        np.testing.assert_array_equal(v, params[k])
    with pytest.raises(ValueError, match="do not match"):
        set_params(model, {"nope": np.zeros(1, np.float32)})
