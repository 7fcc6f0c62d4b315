"""Run-config parsing: clear one-line errors, and docs/pyproject that cannot drift."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from fedserver.cli import main as pollen_main
from fedserver.config import ConfigError, RunConfig, parse_overrides, parse_run_config
from fedserver.config_docs import pyproject_block, readme_table

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_parse_and_round_trip():
    cfg = parse_run_config({})
    assert cfg == RunConfig()
    assert parse_run_config(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"lrr": 0.1}, "unknown run-config key 'lrr' (did you mean 'lr'?)"),
        ({"lr": "fast"}, "'lr' must be a number > 0, got 'fast'"),
        ({"lr": 0}, "'lr' must be a number > 0"),
        ({"batch-size": 2.5}, "'batch-size' must be an integer >= 1"),
        ({"num-server-rounds": True}, "'num-server-rounds' must be an integer"),
        ({"dataset": "cifar"}, "allowed: digits | mnist | synthetic | hub | files"),
        ({"model": "resnet"}, "allowed: logreg | mlp | cnn"),
        ({"partitioner": "pathological"}, "allowed: iid | dirichlet | shards"),
        ({"strategy": "sgd"}, "allowed: fedavg | block-momentum"),
        ({"test-fraction": 1.0}, "'test-fraction' must be a number > 0 and < 1"),
        ({"nesterov": "yes"}, "'nesterov' must be true or false"),
        ({"nesterov": True}, "'nesterov' is only allowed with strategy='block-momentum'"),
        ({"dataset": "files"}, "'data-path' must name a data file"),
        ({"lr": float("inf")}, "'lr' must be finite"),
    ],
)
def test_bad_values_give_one_clear_line(raw, fragment):
    with pytest.raises(ConfigError) as err:
        parse_run_config(raw)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


def test_values_are_coerced_to_their_types():
    cfg = parse_run_config({"lr": 1, "num-server-rounds": 3.0, "nesterov": "true", "strategy": "block-momentum"})
    assert isinstance(cfg.lr, float) and cfg.lr == 1.0
    assert isinstance(cfg.num_server_rounds, int) and cfg.num_server_rounds == 3
    assert cfg.nesterov is True


def test_overrides_parse_like_flwr_and_accept_bare_words():
    assert parse_overrides('dataset=mnist lr=0.05 nesterov=true run-name="a b"') == {
        "dataset": "mnist",
        "lr": 0.05,
        "nesterov": True,
        "run-name": "a b",
    }
    with pytest.raises(ConfigError):
        parse_overrides("justakey")


def test_pyproject_lists_every_key_with_its_default():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == tomllib.loads(pyproject_block())
    assert parse_run_config(pyproject["tool"]["flwr"]["app"]["config"]) == RunConfig()


def test_readme_has_the_generated_key_table():
    assert readme_table() in (ROOT / "README.md").read_text(), (
        "README's run-config table is out of date: paste `pollen config --format markdown`"
    )


def test_config_names_match_the_registries():
    from fedserver import config
    from simulations.datasets import DATASETS, PARTITIONERS
    from simulations.models import MODELS
    from strategies.server_optimizers import SERVER_OPTIMIZERS

    assert set(config.DATASETS) == set(DATASETS)
    assert set(config.PARTITIONERS) == set(PARTITIONERS)
    assert set(config.MODELS) == set(MODELS)
    assert set(config.STRATEGIES) <= set(SERVER_OPTIMIZERS)


def test_cli_check_prints_one_line_error(capsys):
    assert pollen_main(["config", "--check", "clients-per-round=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"pollen: error: run-config key 'clients-per-round' must be an integer >= 1, got 0", err)


def test_cli_run_rejects_bad_config_before_starting_anything(capsys):
    assert pollen_main(["run", "--run-config", "model=transformer"]) == 2
    err = capsys.readouterr().err
    assert "model" in err and "logreg | mlp | cnn" in err
