"""Builds the pieces a run config names (data, model, local training), cached per process.

Both apps use these: the ClientApp for training, the ServerApp for the central test set and
the initial model. Caches are keyed by the values that define the object, so a Ray actor or
SuperNode process that serves many rounds (or many virtual clients) builds each data set,
partition index and model once.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fedclient.training import LocalTraining
from fedserver.config import RunConfig
from simulations.datasets import DataSpec, FederatedData, load_federated
from simulations.models import build_model


def data_spec(cfg: RunConfig, data_path: str | None = None) -> DataSpec:
    """The data part of the run config (``data_path`` from a node's config wins)."""
    return DataSpec(
        dataset=cfg.dataset,
        partitioner=cfg.partitioner,
        dirichlet_alpha=cfg.dirichlet_alpha,
        shards_per_client=cfg.shards_per_client,
        test_fraction=cfg.test_fraction,
        samples_per_client=cfg.samples_per_client,
        synthetic_alpha=cfg.synthetic_alpha,
        synthetic_beta=cfg.synthetic_beta,
        hub_dataset=cfg.hub_dataset,
        data_path=data_path if data_path else cfg.data_path,
        num_classes=cfg.num_classes,
        seed=cfg.seed,
    )


def local_training(cfg: RunConfig) -> LocalTraining:
    return LocalTraining(
        epochs=cfg.local_epochs,
        steps=cfg.local_steps,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )


@functools.lru_cache(maxsize=4)
def federated_data(spec: DataSpec, num_partitions: int) -> FederatedData:
    return load_federated(spec, num_partitions)


def new_model(cfg: RunConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A freshly initialised model; the init depends only on ``seed`` (same on every node)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_model(cfg.model, tuple(input_shape), num_classes, cfg.hidden_size)


@functools.lru_cache(maxsize=4)
def cached_model(
    model: str, input_shape: tuple[int, ...], num_classes: int, hidden_size: int, device: str
) -> nn.Module:
    """One model object per (architecture, device) per process; weights are overwritten each round."""
    return build_model(model, input_shape, num_classes, hidden_size).to(device)
