"""End to end through Flower: `pollen run` → private SuperLink → `flwr run` → run directory."""

from __future__ import annotations

import json

import pytest

from fedserver.cli import main as pollen_main

pytestmark = pytest.mark.e2e


def test_pollen_run_two_rounds_writes_the_run_directory(tmp_path, capsys):
    code = pollen_main(
        [
            "run",
            "-c", f"num-server-rounds=2 output-dir={tmp_path} run-name=e2e clients-per-round=4 local-epochs=1",
            "-f", "num-supernodes=4",
            "--timeout", "400",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    run = tmp_path / "e2e"
    config = json.loads((run / "config.json").read_text())
    assert config["run_config"]["num-server-rounds"] == 2
    assert config["num_nodes"] == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert {"train_loss", "eval_loss", "accuracy", "clients", "bytes_up", "bytes_down", "wall_s"} <= row.keys()
        assert row["clients"] == 4
        # 4 float32 deltas of a 26,122-parameter MLP went up; payload sizes are real, not estimates
        assert 4 * 26_122 * 4 < row["bytes_up"] < 4 * 26_122 * 4 * 1.05
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] - 0.05
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["num_params"] == 26_122
    assert (run / "model.pt").stat().st_size > 26_122 * 4
    assert (run / "checkpoint.pt").exists() and (run / "metrics.png").stat().st_size > 1000
    assert "round   2/2" in out
