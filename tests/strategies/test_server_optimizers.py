"""Server optimizers against independent references: FedAvg, BMUF (CBM/NBM), SlowMo, Flower's
FedAvgM and FedYogi, PyTorch SGD, NumPy FedAdam/FedAMS/FedYogi transcriptions; plus checkpoints
and config validation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.server_optimizers import (
    SERVER_OPTIMIZERS,
    AMSGradOptimizer,
    BlockMomentumOptimizer,
    Params,
    ServerOptimizer,
    ServerOptimizerSpec,
    build_server_optimizer,
)

SHAPES = {"conv.weight": (2, 3, 3), "conv.bias": (2,), "fc.weight": (4, 5)}
DIM = sum(int(np.prod(shape)) for shape in SHAPES.values())


def random_params(rng: np.random.Generator, dtype=np.float32, scale: float = 1.0) -> Params:
    return {k: (scale * rng.standard_normal(s)).astype(dtype) for k, s in SHAPES.items()}


def flat(params: Params) -> np.ndarray:
    return np.concatenate([params[k].ravel() for k in SHAPES])


def unflat(vector: np.ndarray, dtype=np.float64) -> Params:
    out, start = {}, 0
    for key, shape in SHAPES.items():
        size = int(np.prod(shape))
        out[key] = vector[start : start + size].reshape(shape).astype(dtype)
        start += size
    return out


def assert_params_equal(a: Params, b: Params) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def quadratic_clients(rng: np.random.Generator, num_clients: int) -> list[np.ndarray]:
    """Optima c_i of heterogeneous client objectives f_i(x) = ½‖x − c_i‖²."""
    return [rng.standard_normal(DIM) * (i + 1) for i in range(num_clients)]


def local_sgd(start: np.ndarray, optimum: np.ndarray, lr: float, steps: int) -> np.ndarray:
    """K plain gradient steps on ½‖y − c‖² from ``start``."""
    y = start.copy()
    for _ in range(steps):
        y = y - lr * (y - optimum)
    return y


def spec_for(name: str, **overrides) -> ServerOptimizerSpec:
    defaults = (
        {"block_momentum": 0.8} if name in {"block-momentum", "bmuf", "slowmo", "fedavgm"} else {}
    )
    if name in {"amsgrad", "adam", "yogi"}:
        defaults = {"server_lr": 0.05, "eps": 1e-3}
    return ServerOptimizerSpec(name=name, **{**defaults, **overrides})


# ---------------------------------------------------------------- FedAvg and block momentum


def test_fedavg_with_one_client_and_one_step_is_gradient_descent():
    rng = np.random.default_rng(0)
    (optimum,) = quadratic_clients(rng, 1)
    opt = build_server_optimizer(ServerOptimizerSpec("fedavg"))
    x = unflat(rng.standard_normal(optimum.size))
    reference = flat(x)
    for _ in range(20):
        client = local_sgd(flat(x), optimum, lr=0.3, steps=1)
        x = opt.step(x, unflat(client - flat(x)))
        reference = reference - 0.3 * (reference - optimum)
        np.testing.assert_allclose(flat(x), reference, rtol=0, atol=1e-12)
    assert opt.num_steps == 20


@pytest.mark.parametrize("nesterov", [False, True])
def test_block_momentum_with_zero_momentum_is_fedavg_bitwise(nesterov):
    rng = np.random.default_rng(1)
    fedavg = build_server_optimizer(ServerOptimizerSpec("fedavg"))
    block = build_server_optimizer(ServerOptimizerSpec("block-momentum", nesterov=nesterov))
    x_avg = x_block = random_params(rng)
    sizes = np.array([30.0, 70.0])
    for _ in range(5):
        assert_params_equal(block.send_point(x_block), x_block)
        client_deltas = [random_params(rng, scale=0.1) for _ in sizes]
        mean_delta = {
            k: sum(p * d[k] for p, d in zip(sizes / sizes.sum(), client_deltas, strict=True))
            for k in SHAPES
        }
        x_avg = fedavg.step(x_avg, mean_delta)
        x_block = block.step(x_block, mean_delta)
        assert_params_equal(x_block, x_avg)


def test_block_momentum_on_quadratic_is_closed_form_heavy_ball():
    """f = ½‖x‖², 1 client, K = 1: x_{t+1} = x_t − η γ x_t + μ (x_t − x_{t−1})."""
    lr, block_lr, mu = 0.1, 0.7, 0.9
    opt = BlockMomentumOptimizer(server_lr=block_lr, momentum=mu)
    rng = np.random.default_rng(2)
    x = unflat(rng.standard_normal(DIM))
    previous = current = flat(x)
    initial_norm = np.linalg.norm(current)
    for _ in range(40):
        start = flat(opt.send_point(x))
        client = start - lr * start  # one SGD step, ∇f(y) = y
        x = opt.step(x, unflat(client - start))
        previous, current = current, current - block_lr * lr * current + mu * (current - previous)
        np.testing.assert_allclose(flat(x), current, rtol=1e-12, atol=1e-14)
    # Heavy ball contracts here (|roots| = √μ < 1), so the run must have moved towards 0.
    assert np.linalg.norm(current) < 0.5 * initial_norm


@pytest.mark.parametrize("nesterov", [False, True])
def test_block_momentum_matches_bmuf_transcription(nesterov):
    """BMUF (Chen & Huo 2016): G_t = μG + ζ(W̄ − W_g); W = W + G; W_g = W + μG (NBM) or W (CBM)."""
    zeta, mu, local_lr, local_steps = 0.8, 0.75, 0.05, 3
    rng = np.random.default_rng(3)
    optima = quadratic_clients(rng, 3)
    weights = np.array([10.0, 20.0, 50.0]) / 80.0

    w = rng.standard_normal(optima[0].size)
    g = np.zeros_like(w)
    w_global = w.copy()
    opt = BlockMomentumOptimizer(server_lr=zeta, momentum=mu, nesterov=nesterov)
    x = unflat(w)
    for _ in range(15):
        # Pollen
        start = flat(opt.send_point(x))
        np.testing.assert_allclose(start, w_global, rtol=1e-12, atol=1e-12)
        clients = [local_sgd(start, c, local_lr, local_steps) for c in optima]
        mean_delta = sum(p * (y - start) for p, y in zip(weights, clients, strict=True))
        x = opt.step(x, unflat(mean_delta))
        # BMUF, written from the paper's equations
        w_bar = sum(
            p * local_sgd(w_global, c, local_lr, local_steps)
            for p, c in zip(weights, optima, strict=True)
        )
        g = mu * g + zeta * (w_bar - w_global)
        w = w + g
        w_global = w + mu * g if nesterov else w
        np.testing.assert_allclose(flat(x), w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
def test_block_momentum_send_points_follow_torch_sgd_on_pseudo_gradient(nesterov):
    """The point clients start from moves like torch SGD(momentum=μ, nesterov) with grad −Δ̄."""
    torch = pytest.importorskip("torch")
    block_lr, mu, local_lr = 0.9, 0.6, 0.1
    rng = np.random.default_rng(4)
    optima = quadratic_clients(rng, 2)
    x = unflat(rng.standard_normal(optima[0].size))
    opt = BlockMomentumOptimizer(server_lr=block_lr, momentum=mu, nesterov=nesterov)
    param = torch.nn.Parameter(torch.tensor(flat(x), dtype=torch.float64))
    sgd = torch.optim.SGD([param], lr=block_lr, momentum=mu, nesterov=nesterov)
    for _ in range(10):
        start = flat(opt.send_point(x))
        np.testing.assert_allclose(start, param.detach().numpy(), rtol=1e-12, atol=1e-12)
        mean_delta = np.mean([local_sgd(start, c, local_lr, 2) - start for c in optima], axis=0)
        x = opt.step(x, unflat(mean_delta))
        torch_start = param.detach().numpy().copy()
        torch_delta = np.mean(
            [local_sgd(torch_start, c, local_lr, 2) - torch_start for c in optima], axis=0
        )
        param.grad = torch.tensor(-torch_delta)
        sgd.step()
    np.testing.assert_allclose(
        flat(opt.send_point(x)), param.detach().numpy(), rtol=1e-12, atol=1e-12
    )


def test_block_momentum_matches_slowmo_transcription():
    """SlowMo (Wang et al. 2020), constant γ: u ← βu + (x₀ − x̄)/γ ; x ← x₀ − αγu."""
    alpha, beta, gamma = 1.2, 0.7, 0.05
    rng = np.random.default_rng(5)
    optima = quadratic_clients(rng, 4)
    x0 = rng.standard_normal(optima[0].size)
    slow_u = np.zeros_like(x0)
    opt = build_server_optimizer(
        ServerOptimizerSpec("slowmo", server_lr=alpha, block_momentum=beta)
    )
    x = unflat(x0)
    for _ in range(12):
        start = flat(x)
        x_bar = np.mean([local_sgd(start, c, gamma, 4) for c in optima], axis=0)
        x = opt.step(x, unflat(x_bar - start))
        x_bar_slowmo = np.mean([local_sgd(x0, c, gamma, 4) for c in optima], axis=0)
        slow_u = beta * slow_u + (x0 - x_bar_slowmo) / gamma
        x0 = x0 - alpha * gamma * slow_u
        np.testing.assert_allclose(flat(x), x0, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- against Flower's own strategies


@pytest.fixture
def flower_replies(monkeypatch):
    """Build Flower 1.42 train replies outside a running app (Message needs a run id)."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for attribute in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)

    def make(client_models: list[Params], num_examples: list[int]) -> list[Message]:
        replies = []
        for node, (model, n) in enumerate(zip(client_models, num_examples, strict=True)):
            instruction = Message(RecordDict(), dst_node_id=node + 1, message_type="train")
            content = RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in model.items()}),
                    "metrics": MetricRecord({"num-examples": n}),
                }
            )
            replies.append(Message(content, reply_to=instruction))
        return replies

    return make


def test_block_momentum_equals_flower_fedavgm(flower_replies):
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import FedAvgM

    rng = np.random.default_rng(6)
    block_lr, mu, sizes = 0.8, 0.9, [3, 5]
    flower = FedAvgM(server_learning_rate=block_lr, server_momentum=mu)
    x = random_params(rng)
    flower.current_arrays = ArrayRecord({k: Array(v) for k, v in x.items()})
    opt = build_server_optimizer(
        ServerOptimizerSpec("fedavgm", server_lr=block_lr, block_momentum=mu)
    )
    weights = np.array(sizes) / sum(sizes)
    for round_ in range(1, 6):
        client_deltas = [random_params(rng, scale=0.1) for _ in sizes]
        flower_x = {k: a.numpy() for k, a in flower.current_arrays.items()}
        models = [{k: flower_x[k] + d[k] for k in SHAPES} for d in client_deltas]
        flower_new, _ = flower.aggregate_train(round_, flower_replies(models, sizes))
        mean_delta = {
            k: sum(p * d[k] for p, d in zip(weights, client_deltas, strict=True)) for k in SHAPES
        }
        x = opt.step(x, mean_delta)
        for key in SHAPES:
            np.testing.assert_allclose(x[key], flower_new[key].numpy(), rtol=0, atol=2e-6)


def test_yogi_equals_flower_fedyogi(flower_replies):
    from flwr.serverapp.strategy import FedYogi

    rng = np.random.default_rng(7)
    eta, beta1, beta2, tau = 0.01, 0.9, 0.99, 1e-3
    flower = FedYogi(eta=eta, beta_1=beta1, beta_2=beta2, tau=tau)
    opt = build_server_optimizer(
        ServerOptimizerSpec("yogi", server_lr=eta, beta1=beta1, beta2=beta2, eps=tau)
    )
    x = flower_x = random_params(rng)
    for round_ in range(1, 8):
        delta = random_params(rng, scale=0.1 * round_)
        flower.current_arrays = flower_x  # what FedOpt.configure_train records each round
        flower_new, _ = flower.aggregate_train(
            round_, flower_replies([{k: flower_x[k] + delta[k] for k in SHAPES}], [1])
        )
        flower_x = {k: a.numpy() for k, a in flower_new.items()}
        x = opt.step(x, delta)
        for key in SHAPES:
            np.testing.assert_allclose(x[key], flower_x[key], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- adaptive optimizers


def reference_adaptive(variant, x, deltas, lr, beta1, beta2, eps):
    """Flat float64 transcription of FedAdam / FedYogi / FedAMS (no bias correction)."""
    m, v, v_hat, xs = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x), []
    for d in deltas:
        m = beta1 * m + (1 - beta1) * d
        if variant == "yogi":
            v = v - (1 - beta2) * d * d * np.sign(v - d * d)
        else:
            v = beta2 * v + (1 - beta2) * d * d
        v_hat = np.maximum(v_hat, v)
        x = x + lr * m / (np.sqrt(v_hat if variant == "amsgrad" else v) + eps)
        xs.append(x)
    return xs, v, v_hat


def scripted_deltas(rng: np.random.Generator, steps: int) -> list[np.ndarray]:
    """Mostly small updates with a burst, so v later drops below v̂ (the AMSGrad max matters)."""
    scales = [0.05] * 3 + [2.0] * 2 + [0.01] * (steps - 5)
    return [scale * rng.standard_normal(DIM) for scale in scales]


@pytest.mark.parametrize("variant", ["amsgrad", "adam", "yogi"])
def test_adaptive_matches_numpy_reference(variant):
    rng = np.random.default_rng(8)
    lr, beta1, beta2, eps = 0.1, 0.9, 0.99, 1e-8
    x0 = rng.standard_normal(DIM)
    deltas = scripted_deltas(rng, 25)
    expected, v_ref, v_hat_ref = reference_adaptive(variant, x0, deltas, lr, beta1, beta2, eps)
    opt = build_server_optimizer(
        ServerOptimizerSpec(variant, server_lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    )
    x = unflat(x0)
    for d, x_ref in zip(deltas, expected, strict=True):
        x = opt.step(x, unflat(d))
        np.testing.assert_allclose(flat(x), x_ref, rtol=0, atol=1e-7)
    if variant == "amsgrad":
        # The max must have been active, else this test could not tell AMSGrad from Adam.
        assert np.all(v_ref < v_hat_ref)
        np.testing.assert_allclose(flat(unflat_state(opt, "v_hat")), v_hat_ref, rtol=1e-12)


def test_adaptive_float32_stays_float32_and_close_to_float64():
    rng = np.random.default_rng(9)
    x0 = rng.standard_normal(DIM)
    deltas = scripted_deltas(rng, 10)
    expected, _, _ = reference_adaptive("amsgrad", x0, deltas, 0.1, 0.9, 0.99, 1e-8)
    opt = AMSGradOptimizer(server_lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
    x = unflat(x0, dtype=np.float32)
    for d in deltas:
        x = opt.step(x, unflat(d, dtype=np.float64))  # float64 delta must not upcast the model
    assert all(a.dtype == np.float32 for a in x.values())
    assert all(a.dtype == np.float32 for k, a in opt.state_dict().items() if k != "num_steps")
    np.testing.assert_allclose(flat(x), expected[-1], rtol=0, atol=1e-5)


def unflat_state(opt: ServerOptimizer, buffer: str) -> Params:
    state = opt.state_dict()
    return {k: state[f"{buffer}/{k}"] for k in SHAPES}


@settings(max_examples=40, deadline=None)
@given(
    scales=st.lists(st.floats(min_value=0.0, max_value=1e3), min_size=1, max_size=20),
    beta2=st.floats(min_value=0.0, max_value=0.999),
    seed=st.integers(0, 2**32 - 1),
)
def test_amsgrad_v_hat_is_non_decreasing_and_dominates_v(scales, beta2, seed):
    rng = np.random.default_rng(seed)
    opt = AMSGradOptimizer(server_lr=0.01, beta1=0.9, beta2=beta2, eps=1e-8)
    x = random_params(rng)
    previous = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    for scale in scales:
        x = opt.step(x, random_params(rng, scale=scale))
        v_hat, v = unflat_state(opt, "v_hat"), unflat_state(opt, "v")
        for key in SHAPES:
            assert np.all(v_hat[key] >= previous[key])
            assert np.all(v_hat[key] >= v[key])
        previous = v_hat


@settings(max_examples=30, deadline=None)
@given(
    scales=st.lists(st.floats(min_value=0.0, max_value=1e3), min_size=1, max_size=20),
    seed=st.integers(0, 2**32 - 1),
)
def test_yogi_second_moment_stays_non_negative(scales, seed):
    rng = np.random.default_rng(seed)
    opt = build_server_optimizer(ServerOptimizerSpec("yogi", server_lr=0.01))
    x = random_params(rng)
    for scale in scales:
        x = opt.step(x, random_params(rng, scale=scale))
        assert all(np.all(v >= 0) for v in unflat_state(opt, "v").values())
        assert all(np.all(np.isfinite(a)) for a in x.values())


# ---------------------------------------------------------------- state, checkpoints, purity

ALL_SPECS = [spec_for(name) for name in SERVER_OPTIMIZERS] + [
    ServerOptimizerSpec("block-momentum", server_lr=0.9, block_momentum=0.7, nesterov=True)
]


def checkpoint_roundtrip(state: dict) -> dict:
    """Through np.savez, as a checkpoint on disk would be."""
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    buffer.seek(0)
    with np.load(buffer) as loaded:
        return {k: loaded[k] for k in loaded.files}


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: f"{s.name}-nesterov={s.nesterov}")
def test_state_dict_resume_is_bitwise_identical(spec):
    rng = np.random.default_rng(10)
    x0 = random_params(rng)
    deltas = [random_params(rng, scale=0.1) for _ in range(10)]

    def run(opt, x, steps):
        sent = []
        for d in steps:
            sent.append(opt.send_point(x))
            x = opt.step(x, d)
        return x, sent

    uninterrupted = build_server_optimizer(spec)
    x_full, sent_full = run(uninterrupted, x0, deltas)

    first = build_server_optimizer(spec)
    x_half, sent_first = run(first, x0, deltas[:5])
    resumed = build_server_optimizer(spec)
    resumed.load_state_dict(checkpoint_roundtrip(first.state_dict()))
    assert resumed.num_steps == 5
    x_resumed, sent_second = run(resumed, x_half, deltas[5:])

    assert_params_equal(x_resumed, x_full)
    for a, b in zip(sent_first + sent_second, sent_full, strict=True):
        assert_params_equal(a, b)
    assert resumed.state_dict().keys() == uninterrupted.state_dict().keys()


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: f"{s.name}-nesterov={s.nesterov}")
def test_step_does_not_mutate_or_alias_caller_arrays(spec):
    rng = np.random.default_rng(11)
    opt = build_server_optimizer(spec)
    x, delta = random_params(rng), random_params(rng, scale=0.1)
    x = opt.step(x, delta)  # build state first, so later steps touch buffers
    x_copy = {k: v.copy() for k, v in x.items()}
    delta_copy = {k: v.copy() for k, v in delta.items()}
    new_x = opt.step(x, delta)
    assert_params_equal(x, x_copy)
    assert_params_equal(delta, delta_copy)
    state_before = opt.state_dict()
    sent = opt.send_point(x)
    for key in SHAPES:  # vandalise everything the caller holds; the optimizer must not notice
        for held in (new_x, delta, sent):
            held[key][...] = np.nan
    for key, value in opt.state_dict().items():
        np.testing.assert_array_equal(value, state_before[key])


def test_state_dict_returns_copies():
    rng = np.random.default_rng(12)
    opt = build_server_optimizer(spec_for("amsgrad"))
    opt.step(random_params(rng), random_params(rng))
    state = opt.state_dict()
    state["m/fc.weight"][...] = 123.0
    assert not np.any(opt.state_dict()["m/fc.weight"] == 123.0)


def test_load_state_dict_rejects_foreign_or_incomplete_state():
    rng = np.random.default_rng(13)
    amsgrad = build_server_optimizer(spec_for("amsgrad"))
    amsgrad.step(random_params(rng), random_params(rng))
    with pytest.raises(ValueError, match="unexpected state key 'v_hat/"):
        build_server_optimizer(spec_for("adam")).load_state_dict(amsgrad.state_dict())
    adam = build_server_optimizer(spec_for("adam"))
    adam.step(random_params(rng), random_params(rng))
    with pytest.raises(ValueError, match=r"missing buffers \['v_hat'\]"):
        build_server_optimizer(spec_for("amsgrad")).load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="num_steps"):
        build_server_optimizer(spec_for("fedavg")).load_state_dict({})
    partial = {k: v for k, v in amsgrad.state_dict().items() if k != "v/conv.bias"}
    with pytest.raises(ValueError, match="different parameters"):
        build_server_optimizer(spec_for("amsgrad")).load_state_dict(partial)


def test_step_rejects_mismatched_delta():
    rng = np.random.default_rng(14)
    opt = build_server_optimizer(spec_for("block-momentum"))
    x = random_params(rng)
    with pytest.raises(ValueError, match=r"missing \['fc.weight'\]"):
        opt.step(x, {k: v for k, v in x.items() if k != "fc.weight"})
    with pytest.raises(ValueError, match="shape"):
        opt.step(x, {**x, "conv.bias": np.zeros(3, np.float32)})
    opt.step(x, x)
    with pytest.raises(ValueError, match="shape"):  # buffers were built for the old model
        opt.step(
            {**x, "conv.bias": np.zeros(3, np.float32)}, {**x, "conv.bias": np.zeros(3, np.float32)}
        )


# ---------------------------------------------------------------- registry and spec validation


def test_registry_names_and_aliases():
    assert set(SERVER_OPTIMIZERS) >= {"fedavg", "block-momentum", "amsgrad", "adam", "yogi"}
    for name in ("fedavg", "block-momentum", "amsgrad", "adam", "yogi"):
        assert build_server_optimizer(spec_for(name)).name == name
    for alias in ("bmuf", "slowmo", "fedavgm"):
        assert isinstance(build_server_optimizer(spec_for(alias)), BlockMomentumOptimizer)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"server_lr": -0.1}, "server_lr must be > 0"),
        ({"server_lr": 0.0}, "server_lr must be > 0"),
        ({"server_lr": float("nan")}, "server_lr must be finite"),
        ({"beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
        ({"beta1": -0.1}, r"beta1 must be in \[0, 1\)"),
        ({"beta2": 1.5}, r"beta2 must be in \[0, 1\)"),
        ({"eps": 0.0}, "eps must be > 0"),
        ({"name": "block-momentum", "block_momentum": 1.0}, r"block_momentum must be in \[0, 1\)"),
        ({"name": "block-momentum", "block_momentum": -0.5}, r"block_momentum must be in \[0, 1\)"),
        ({"block_momentum": 0.9}, "apply only to"),
        ({"name": "adam", "nesterov": True}, "apply only to"),
    ],
)
def test_spec_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        ServerOptimizerSpec(**overrides)


def test_unknown_name_lists_allowed_names():
    with pytest.raises(ValueError, match="'fedsgd'") as error:
        ServerOptimizerSpec(name="fedsgd")
    for name in SERVER_OPTIMIZERS:
        assert repr(name) in str(error.value)


def test_spec_rejects_non_numbers():
    with pytest.raises(TypeError, match="server_lr must be a real number"):
        ServerOptimizerSpec(server_lr="0.1")
    with pytest.raises(TypeError, match="nesterov must be a bool"):
        ServerOptimizerSpec(name="bmuf", nesterov="yes")
