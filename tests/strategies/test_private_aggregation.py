"""Central DP end to end: PollenStrategy + the real ClientApp on the in-process grid.

The unit-level properties (sensitivity, noise calibration, accountants, ledger) are tested in
``tests/privacy``; these tests check that a whole run keeps them: the released update is the sum
of bounded client deltas over the fixed denominator, the noise has std z·C/m, client-side
clipping is enforced, adaptive clipping moves C the right way, the budget stops a run in time,
and the ledger, metrics rows and report agree with an independent dp_accounting computation,
also across a killed and resumed run.
"""

from __future__ import annotations

import itertools
import json
import logging

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from fedclient.client_app import app as client_app
from fedclient.components import data_spec, federated_data, new_model
from fedclient.training import get_params
from fedserver.config import ConfigError, parse_run_config
from fedserver.run_dir import RunDirectory
from fedserver.server_app import run_pollen
from privacy.ledger import PrivacyLedger
from strategies import wire
from strategies.factory import build_strategy
from strategies.strategy import to_arrayrecord, to_params
from strategies.sync_driver import run_sync
from tests.support.inprocess_grid import InProcessGrid

BASE = {"device": "cpu", "model": "logreg", "momentum": 0.0, "dataset": "digits"}



def _setup(overrides: dict, num_nodes: int, apps=client_app):
    raw = {**BASE, **overrides}
    cfg = parse_run_config(raw)
    grid = InProcessGrid(apps, num_nodes, run_config=raw)
    data = federated_data(data_spec(cfg), num_nodes)
    model = new_model(cfg, data.input_shape, data.num_classes)
    return cfg, grid, data, get_params(model)


def _gd_delta(params: dict, x: np.ndarray, y: np.ndarray, lr: float, steps: int) -> dict:
    """Full-batch gradient descent on softmax regression in float64 NumPy (reference)."""
    w = params["linear.weight"].astype(np.float64)
    b = params["linear.bias"].astype(np.float64)
    features = x.reshape(len(x), -1).astype(np.float64)
    onehot = np.eye(w.shape[0])[y]
    w0, b0 = w.copy(), b.copy()
    for _ in range(steps):
        logits = features @ w.T + b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        residual = (p - onehot) / len(x)
        w, b = w - lr * residual.T @ features, b - lr * residual.sum(axis=0)
    return {"linear.weight": w - w0, "linear.bias": b - b0}


def _norm(delta: dict) -> float:
    return float(np.sqrt(sum(np.sum(np.square(v)) for v in delta.values())))


def _bound(delta: dict, clip: float, mode: str) -> dict:
    scale = clip / _norm(delta) if mode == "normalize" else min(1.0, clip / _norm(delta))
    return {k: v * scale for k, v in delta.items()}


def _crashing_app(msg, context):
    raise RuntimeError("client crashed")


LOCAL = {"local-steps": 2, "batch-size": 100_000, "lr": 0.5}


@pytest.mark.parametrize(
    ("mode", "where"), [("clip", "server"), ("normalize", "server"), ("clip", "client")]
)
def test_noiseless_release_is_the_bounded_sum_over_the_fixed_denominator(mode, where):
    """z = 0: global update = Σ bound(Δ_i) / m, with a crashed client counted in m."""
    num_nodes = 5
    apps = [client_app] * (num_nodes - 1) + [_crashing_app]
    overrides = {
        **LOCAL, "clients-per-round": num_nodes, "dp-sampling": "fixed", "partitioner": "dirichlet",
        "dirichlet-alpha": 0.5,
    }
    _, _, data, start = _setup(overrides, num_nodes)
    deltas = [
        _gd_delta(start, data.partition(i).x, data.partition(i).y, lr=0.5, steps=2)
        for i in range(num_nodes - 1)
    ]
    norms = sorted(_norm(d) for d in deltas)
    clip = float(np.sqrt(norms[0] * norms[-1]))  # some clients clipped, some not
    assert norms[0] < clip < norms[-1]
    cfg, grid, _, _ = _setup(
        {**overrides, "dp": mode, "dp-where": where, "dp-clip": clip, "dp-noise-multiplier": 0.0},
        num_nodes,
        apps,
    )
    strategy = build_strategy(cfg)
    final = run_sync(grid, strategy, start, num_rounds=1)

    assert strategy.last_round.failed == 1 and strategy.last_round.clients == num_nodes - 1
    expected = {
        k: start[k] + sum(_bound(d, clip, mode)[k] for d in deltas) / num_nodes for k in start
    }
    for k in start:
        np.testing.assert_allclose(final[k], expected[k], rtol=1e-4, atol=1e-6)
    assert strategy.last_round.privacy_metrics["dp_noise_std"] == 0.0
    assert strategy.last_round.privacy_metrics["epsilon"] == float("inf")


def test_noise_std_of_the_released_average_is_z_c_over_m():
    """Zero local updates (lr tiny): each round's model change is the noise alone."""
    num_nodes, per_round, z, clip = 8, 4, 1.5, 0.3
    cfg, grid, _, start = _setup(
        {
            "model": "mlp", "hidden-size": 256, "lr": 1e-30, "local-steps": 1,
            "clients-per-round": per_round, "dp": "clip", "dp-clip": clip,
            "dp-noise-multiplier": z, "dp-sampling": "poisson",
        },
        num_nodes,
    )
    strategy = build_strategy(cfg)
    models = [start]
    cohorts = []
    run_sync(
        grid, strategy, start, num_rounds=2,
        on_round=lambda r: (models.append(r.params), cohorts.append(len(r.stats.cohort))),
    )
    assert all(_norm(u.delta) == 0.0 for u in strategy.last_updates)
    expected_std = z * clip / per_round  # m = q·N = 4, whatever the realised cohort size
    for before, after in itertools.pairwise(models):
        noise = np.concatenate([(after[k] - before[k]).ravel() for k in start]).astype(np.float64)
        n = noise.size
        statistic = np.sum(np.square(noise)) / expected_std**2  # ~ χ²(n) if the std is right
        assert stats.chi2.ppf(1e-4, n) < statistic < stats.chi2.ppf(1 - 1e-4, n)
        assert abs(noise.mean()) < 5 * expected_std / np.sqrt(n)
    assert strategy.last_round.privacy_metrics["dp_noise_std"] == pytest.approx(expected_std)


def _cheating_app(msg, context):
    """A client that sends 10x its (already clipped) update."""
    reply = client_app(msg, context)
    update = to_params(reply.content[wire.UPDATE])
    reply.content[wire.UPDATE] = to_arrayrecord({k: 10 * v for k, v in update.items()})
    return reply


def test_client_side_clipping_rejects_a_longer_update_and_the_round_goes_on():
    num_nodes, clip = 4, 0.05
    overrides = {**LOCAL, "clients-per-round": num_nodes, "dp-sampling": "fixed"}
    _, _, data, start = _setup(overrides, num_nodes)
    cfg, grid, _, _ = _setup(
        {**overrides, "dp": "clip", "dp-where": "client", "dp-clip": clip,
         "dp-noise-multiplier": 0.0},
        num_nodes,
        [_cheating_app] + [client_app] * (num_nodes - 1),
    )
    strategy = build_strategy(cfg)
    final = run_sync(grid, strategy, start, num_rounds=1)

    stats_ = strategy.last_round
    assert stats_.rejected == 1 and stats_.clients == num_nodes - 1 and stats_.applied
    assert "exceeds the clip norm" in stats_.rejections[0]
    honest = [
        _bound(_gd_delta(start, data.partition(i).x, data.partition(i).y, 0.5, 2), clip, "clip")
        for i in range(1, num_nodes)
    ]
    for k in start:
        expected = start[k] + sum(d[k] for d in honest) / num_nodes
        np.testing.assert_allclose(final[k], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("initial", "direction"), [(1e-4, +1), (1e3, -1)])
def test_adaptive_clipping_moves_c_toward_the_update_norms(initial, direction):
    """C far below every norm grows by ≈ e^{η·γ} a round; far above, shrinks by ≈ e^{−η(1−γ)}."""
    rounds, lr_c, quantile = 4, 0.2, 0.5
    cfg, grid, _, start = _setup(
        {**LOCAL, "clients-per-round": 10, "dp": "clip", "dp-adaptive": True,
         "dp-clip": initial, "dp-clip-lr": lr_c, "dp-target-quantile": quantile,
         "dp-noise-multiplier": 0.0},
        num_nodes=10,
    )
    strategy = build_strategy(cfg)
    clips = []
    run_sync(
        grid, strategy, start, num_rounds=rounds,
        on_round=lambda r: clips.append(r.stats.privacy_metrics["dp_next_clip"]),
    )
    steps = np.diff(np.log([initial, *clips]))
    assert np.all(np.sign(steps) == direction)
    expected = lr_c * quantile if direction > 0 else -lr_c * (1 - quantile)
    # The unclipped count carries noise std m/20, i.e. ±0.05 on the fraction: ±0.01 on log C.
    np.testing.assert_allclose(steps, expected, atol=0.05)


def _direct_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    """ε straight from dp_accounting (independent of privacy/)."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(event)
    return accountant.get_epsilon(delta)


REPORT_KEYS = {
    "epsilon", "delta", "accountant", "epsilon_by_accountant", "target_epsilon", "rounds",
    "noise_multiplier", "sample_rate", "sampling", "adjacency", "population", "mode", "where",
    "clip", "epsilon_per_round", "participation", "final_utility", "assumptions",
}


def _pollen_run(tmp_path, overrides: dict, num_nodes: int) -> RunDirectory:
    raw = {
        **BASE, "local-steps": 2, "output-dir": str(tmp_path), "run-name": "dp-run",
        **overrides,
    }
    return run_pollen(InProcessGrid(client_app, num_nodes, run_config=raw), parse_run_config(raw))


@pytest.fixture
def pollen_log(caplog):
    logger = logging.getLogger("pollen")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="pollen")
    yield caplog
    logger.removeHandler(caplog.handler)


def test_budget_stop_ledger_metrics_and_report_of_a_run(tmp_path, pollen_log):
    num_nodes, per_round, z, delta = 10, 2, 2.0, 1e-5
    q = per_round / num_nodes
    target = (_direct_epsilon(z, q, 3, delta) + _direct_epsilon(z, q, 4, delta)) / 2
    run = _pollen_run(
        tmp_path,
        {"num-server-rounds": 6, "clients-per-round": per_round, "dp": "normalize",
         "dp-clip": 0.5, "dp-noise-multiplier": z, "dp-delta": delta,
         "dp-target-epsilon": target},
        num_nodes,
    )
    assert "stopping before round 4: privacy budget reached" in pollen_log.text

    releases = PrivacyLedger.for_run(run.path).releases
    assert [r.round for r in releases] == [1, 2, 3]  # one record per round, none for round 4
    rows = run.read_metrics()
    assert [row["round"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert row["delta"] == delta
        assert row["epsilon"] == pytest.approx(_direct_epsilon(z, q, row["round"], delta), rel=1e-9)
    report = json.loads((run.path / "privacy" / "report.json").read_text())
    assert REPORT_KEYS <= report.keys()
    assert report["rounds"] == 3 and report["epsilon"] <= target
    assert report["epsilon"] == pytest.approx(rows[-1]["epsilon"], rel=1e-9)
    assert report["final_utility"]["value"] == pytest.approx(rows[-1]["accuracy"])
    assert (run.path / "privacy" / "report.md").exists()


def test_a_killed_run_resumes_without_losing_or_double_counting_a_release(
    tmp_path, monkeypatch
):
    num_nodes, per_round, z = 6, 3, 1.0
    overrides = {
        "num-server-rounds": 5, "clients-per-round": per_round, "dp": "clip", "dp-clip": 0.5,
        "dp-noise-multiplier": z,
    }
    save = RunDirectory.save_checkpoint

    def killed_at_round_3(self, checkpoint):
        if checkpoint["round"] == 3:  # after round 3's ledger record and metrics row
            raise KeyboardInterrupt("killed")
        save(self, checkpoint)

    monkeypatch.setattr(RunDirectory, "save_checkpoint", killed_at_round_3)
    with pytest.raises(KeyboardInterrupt):
        _pollen_run(tmp_path, overrides, num_nodes)
    killed = RunDirectory.create(tmp_path, "dp-run", 0, exist_ok=True)
    assert [r.round for r in PrivacyLedger.for_run(killed.path).releases] == [1, 2, 3]
    killed_rows = killed.read_metrics()
    assert [row["round"] for row in killed_rows] == [1, 2, 3]  # round 3 was not checkpointed

    monkeypatch.setattr(RunDirectory, "save_checkpoint", save)
    run = _pollen_run(tmp_path, {**overrides, "resume": True}, num_nodes)

    lines = (run.path / "privacy" / "ledger.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3, 4, 5]
    rows = run.read_metrics()
    assert [row["round"] for row in rows] == [1, 2, 3, 4, 5]
    # The re-run round 3 is the same release (cohort, noise), so recording it again was a no-op.
    assert rows[2]["accuracy"] == killed_rows[2]["accuracy"]
    assert rows[2]["epsilon"] == killed_rows[2]["epsilon"]
    q = per_round / num_nodes
    assert rows[-1]["epsilon"] == pytest.approx(_direct_epsilon(z, q, 5, 1e-5), rel=1e-9)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dp": "clip", "dp-clip": 0.0}, "'dp-clip' must be a number > 0"),
        ({"dp": "clip", "dp-noise-multiplier": -1.0}, "'dp-noise-multiplier' must be a number >= 0"),
        ({"dp": "clip", "dp-delta": 1.0}, "'dp-delta' must be a number > 0 and < 1"),
        ({"dp": "clip", "dp-population": 3, "clients-per-round": 5}, r"q = clients-per-round"),
        ({"dp": "off", "dp-target-epsilon": 1.0}, "'dp-target-epsilon' needs dp="),
        ({"dp": "clip", "dp-noise-multiplier": 0.0, "dp-target-epsilon": 1.0}, "no finite epsilon"),
        ({"dp": "clip", "dp-adaptive": True, "clients-per-round": 5}, "clients-per-round > 10"),
        ({"dpsgd": True, "dpsgd-max-grad-norm": 0.0}, "'dpsgd-max-grad-norm' must be a number > 0"),
        ({"dpsgd": True, "dpsgd-noise-multiplier": -0.5}, "'dpsgd-noise-multiplier' must be"),
    ],
)
def test_bad_dp_settings_are_rejected_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config({**BASE, **overrides})


def test_a_target_epsilon_below_one_round_fails_before_any_round(tmp_path):
    with pytest.raises(ConfigError, match="below the epsilon of a single round") as error:
        _pollen_run(
            tmp_path,
            {"num-server-rounds": 3, "clients-per-round": 5, "dp": "clip",
             "dp-noise-multiplier": 1.0, "dp-target-epsilon": 0.5},
            num_nodes=10,
        )
    assert "pollen privacy plan" in str(error.value)
    assert not (tmp_path / "dp-run" / "privacy" / "ledger.jsonl").exists()
