"""The default federation reaches the accuracy the README promises (in-process, same code path)."""

from __future__ import annotations

import json

import pytest

from fedclient.client_app import app as client_app
from fedserver.config import parse_run_config
from fedserver.server_app import run_pollen
from simulations.inprocess_grid import InProcessGrid

NUM_NODES = 10  # `pollen run`'s default federation


def _run(tmp_path, **overrides):
    raw = {"output-dir": str(tmp_path), "run-name": "acc", **overrides}
    run = run_pollen(InProcessGrid(client_app, NUM_NODES, run_config=raw), parse_run_config(raw))
    return [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]


def test_default_run_reaches_90_percent(tmp_path):
    rows = _run(tmp_path)
    assert len(rows) == 20
    assert rows[-1]["accuracy"] >= 0.90


@pytest.mark.parametrize("alpha", [0.3])
def test_dirichlet_split_reaches_85_percent_within_twice_the_rounds(tmp_path, alpha):
    rows = _run(tmp_path, partitioner="dirichlet", **{"dirichlet-alpha": alpha, "num-server-rounds": 40})
    assert max(r["accuracy"] for r in rows) >= 0.85
    assert rows[-1]["accuracy"] >= 0.85
