"""Tests for privacy/dpsgd.py: DP-SGD trains a toy model; the client's ε composes over rounds."""

import json
import warnings

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.dpsgd import client_epsilon, make_private


@pytest.fixture(autouse=True)
def quiet_opacus():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def toy_data():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(512, 2, generator=generator)
    labels = (features[:, 0] + features[:, 1] > 0).long()
    return features, labels


def train_round(model, features, labels, state, epochs=2):
    loader = DataLoader(TensorDataset(features, labels), batch_size=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    training = make_private(
        model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0, accountant_state=state
    )
    epsilons = []
    for _ in range(epochs):
        for batch, target in training.data_loader:
            training.optimizer.zero_grad()
            nn.functional.cross_entropy(training.module(batch), target).backward()
            training.optimizer.step()
        epsilons.append(training.epsilon(1e-5))
    return training, epsilons


def accuracy(model, features, labels):
    with torch.no_grad():
        return (model(features).argmax(dim=1) == labels).float().mean().item()


def test_dp_sgd_trains_and_client_epsilon_composes_across_rounds():
    torch.manual_seed(1)
    features, labels = toy_data()
    model = nn.Linear(2, 2)
    before = accuracy(model, features, labels)
    training, first = train_round(model, features, labels, state=None)
    assert first[0] < first[1]  # ε grows with steps
    assert accuracy(model, features, labels) > max(0.9, before)

    state = json.loads(
        json.dumps(training.accountant_state())
    )  # what the client stores between rounds
    assert state == {"mechanism": "rdp", "history": [[1.0, 0.125, 16]]}
    assert client_epsilon(state, 1e-5) == pytest.approx(first[-1])
    reference = RDPAccountant()
    reference.history = [(1.0, 0.125, 16)]
    assert first[-1] == pytest.approx(reference.get_epsilon(1e-5))

    # next round: a fresh model wrap resumes the history instead of restarting at ε = 0
    _, second = train_round(nn.Linear(2, 2), features, labels, state=state, epochs=1)
    resumed = RDPAccountant()
    resumed.history = [(1.0, 0.125, 24)]
    assert second[0] == pytest.approx(resumed.get_epsilon(1e-5)) and second[0] > first[-1]


def test_bad_inputs():
    assert client_epsilon(None, 1e-5) == 0.0
    with pytest.raises(ValueError, match="expected 'rdp'"):
        client_epsilon({"mechanism": "prv", "history": []}, 1e-5)
    loader = DataLoader(
        TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)), batch_size=2
    )
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="max_grad_norm"):
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            loader,
            noise_multiplier=1.0,
            max_grad_norm=0.0,
        )
