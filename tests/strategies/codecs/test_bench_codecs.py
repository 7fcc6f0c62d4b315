"""Smoke test of the codec benchmark (simulations/bench_codecs.py) on a small update."""

from __future__ import annotations

import json

import pytest

from simulations.bench_codecs import run, synthetic_update


def test_benchmark_reports_every_codec_and_writes_json(tmp_path, capsys):
    results = run(tmp_path, num_params=20_000, repeats=1)
    assert json.loads((tmp_path / "bench_codecs.json").read_text()) == results
    rows = {row["codec"]: row for row in results["codecs"]}
    assert rows["none"]["bits_per_param"] == 32 and rows["none"]["rel_l2_error"] == 0
    assert rows["fp16"]["bits_per_param"] == rows["bf16"]["bits_per_param"] == 16
    assert rows["topk 1%"]["bits_per_param"] == pytest.approx(0.64)
    assert rows["sign"]["bits_per_param"] == pytest.approx(1 + 8 * 32 / 20_000)
    co3 = rows["co3 fp4 (paper rule)"]
    assert co3["bits_per_param"] < 4 and 0 < co3["rel_l2_error"] < 0.3
    assert rows["fp4 symbol entropy (bound)"]["bits_per_param"] < co3["bits_per_param"]
    assert [row["beta"] for row in results["scale_rules"]] == [0.3, 0.5, 1.0, 2.0, 3.0]
    assert "co3 fp4 (paper rule)" in capsys.readouterr().out


def test_synthetic_update_has_the_requested_size():
    update = synthetic_update(50_000)
    assert sum(v.size for v in update.values()) == 50_000
    with pytest.raises(ValueError, match="num_params"):
        synthetic_update(5)
