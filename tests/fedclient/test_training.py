"""Moving weights between NumPy and a torch model: exact, in place, any model dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedclient.training import (
    LocalTraining,
    PlainSGD,
    batch_order,
    get_params,
    params_delta,
    seeded_generator,
    set_params,
    train_local,
)


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


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.0, 1e-3), (0.5, 1e-2)])
def test_plain_sgd_is_bitwise_torch_sgd(momentum, weight_decay):
    """Both layouts train with PlainSGD; it must be torch.optim.SGD to the last bit."""
    torch.manual_seed(1)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    frozen = _model(torch.float32)
    frozen[0].bias.requires_grad_(False)  # a parameter without gradient is left alone
    models = [frozen, _model(torch.float32)]
    models[1].load_state_dict(models[0].state_dict())
    models[1][0].bias.requires_grad_(False)
    ours = PlainSGD(models[0].parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    ref = torch.optim.SGD(models[1].parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    for step in range(6):
        batch = slice(8 * (step % 5), 8 * (step % 5) + 8)
        for model, opt in ((models[0], ours), (models[1], ref)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(models[0][0].weight, _model(torch.float32)[0].weight)  # it did train


def test_train_local_reports_the_mean_batch_loss_and_steps():
    torch.manual_seed(2)
    model = _model(torch.float32)
    x, y = torch.randn(50, 6), torch.randint(0, 3, (50,))
    spec = LocalTraining(epochs=2, lr=0.05, batch_size=16)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_local(model, x, y, spec, seeded_generator(0, 1, 2))
    assert (result.num_examples, result.steps) == (50, 8)  # 2 epochs × ceil(50/16)
    # replay: the same batches and the same steps give the same mean loss
    model.load_state_dict(start)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    losses = []
    for idx in batch_order(50, spec, seeded_generator(0, 1, 2)):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert result.loss == pytest.approx(float(np.mean(losses)), rel=1e-12)
