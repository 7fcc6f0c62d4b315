"""Tests for simulations.models: shapes on every dataset's input, init, DP-compatibility, accuracy."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from simulations.datasets import DataSpec, load_federated
from simulations.models import MODELS, build_model

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [*SHAPES, (60,)])
def test_forward_gives_one_logit_per_class(name, shape):
    if name == "cnn" and len(shape) != 3:
        with pytest.raises(ValueError, match=r"needs image input of shape \(C, H, W\)"):
            build_model(name, shape, 10)
        return
    model = build_model(name, shape, num_classes=7, hidden_size=16)
    assert model(torch.rand(5, *shape)).shape == (5, 7)


def test_unknown_model_and_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="model='resnet' is unknown; allowed: logreg, mlp, cnn"):
        build_model("resnet", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        build_model("mlp", (60,), 1)


@pytest.mark.parametrize("name", MODELS)
def test_initialisation_follows_torch_manual_seed(name):
    def weights(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return list(build_model(name, (1, 8, 8), 10).state_dict().values())

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("name", MODELS)
def test_models_are_opacus_compatible_with_exact_per_sample_gradients(name):
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), 10, hidden_size=8)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not list(model.buffers())  # state_dict is exactly the parameters
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 3, 9, 3])
    reference = copy.deepcopy(model)  # plain autograd, one backward pass per example
    expected = [
        torch.autograd.grad(nn.functional.cross_entropy(reference(x[i:i + 1]), y[i:i + 1]),
                            list(reference.parameters()))
        for i in range(4)
    ]
    per_sample = GradSampleModule(model, loss_reduction="sum")
    nn.functional.cross_entropy(per_sample(x), y, reduction="sum").backward()
    for index, param in enumerate(model.parameters()):
        assert torch.allclose(param.grad_sample, torch.stack([g[index] for g in expected]),
                              atol=1e-6)


def test_central_mlp_on_digits_beats_ninety_percent_in_five_epochs():
    data = load_federated(DataSpec(dataset="digits", seed=0), 1)
    train, test = data.partition(0), data.test_set()
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, data.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    order = np.random.default_rng(0)
    for _ in range(5):
        for batch in np.array_split(order.permutation(len(train)), len(train) // 64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(test.x)).argmax(1).numpy() == test.y).mean()
    assert accuracy > 0.9
