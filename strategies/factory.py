"""Assembles a :class:`PollenStrategy` from a run config: one place that maps keys to parts."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from fedserver.config import RunConfig
from privacy.ledger import PrivacyLedger
from privacy.mechanisms import DpSpec
from strategies.async_driver import AsyncDriver
from strategies.codecs import Codec, CodecSpec, build_codec, build_error_feedback
from strategies.packed_layout import PackedLayout
from strategies.private_aggregation import PrivateAggregation
from strategies.server_optimizers import ServerOptimizerSpec, build_server_optimizer
from strategies.staleness import StalenessPolicy
from strategies.strategy import PollenStrategy
from strategies.updates import UpdateLimits
from strategies.virtual_clock import ClockSpec, VirtualClock


def server_optimizer_spec(cfg: RunConfig) -> ServerOptimizerSpec:
    return ServerOptimizerSpec(
        name=cfg.strategy,
        server_lr=cfg.server_lr,
        block_momentum=cfg.block_momentum,
        nesterov=cfg.nesterov,
        beta1=cfg.server_beta1,
        beta2=cfg.server_beta2,
        eps=cfg.server_eps,
    )


def codec_spec(cfg: RunConfig) -> CodecSpec:
    return CodecSpec(
        name=cfg.codec,
        topk_ratio=cfg.topk_ratio,
        co3_exponent_bits=cfg.co3_exponent_bits,
        co3_mantissa_bits=cfg.co3_mantissa_bits,
        co3_decay=cfg.co3_decay,
        co3_scale_rule=cfg.co3_scale_rule,
        error_feedback=cfg.error_feedback,
        ef_decay=cfg.ef_decay,
    )


def build_codec_for(cfg: RunConfig) -> Codec:
    """The codec both sides use: clients encode with it, the server decodes with it."""
    return build_codec(codec_spec(cfg))


# Decoded norms measured above C after client-side clipping: sign 1.4%, top-k 1.0%, CO3 0.3%.
LOSSY_CODEC_NORM_TOLERANCE = 0.05


def dp_spec(cfg: RunConfig) -> DpSpec:
    return DpSpec(
        mode=cfg.dp,
        clip=cfg.dp_clip,
        noise_multiplier=cfg.dp_noise_multiplier,
        delta=cfg.dp_delta,
        where=cfg.dp_where,
        adaptive=cfg.dp_adaptive,
        target_quantile=cfg.dp_target_quantile,
        clip_lr=cfg.dp_clip_lr,
        sampling=cfg.dp_sampling,
        population=cfg.dp_population,
        accountant=cfg.dp_accountant,
        target_epsilon=cfg.dp_target_epsilon,
    )


def update_limits(cfg: RunConfig) -> UpdateLimits:
    """The bounds every update is validated against (by the server, or a packed worker)."""
    return UpdateLimits(max_update_norm=cfg.max_update_norm, max_payload_bytes=cfg.max_payload_bytes)


def clients_keep_state(cfg: RunConfig) -> bool:
    """Whether clients carry private state from round to round (error feedback, DP-SGD).

    The packed layout then gives every client a fixed home worker, where its state lives.
    """
    codec = build_codec_for(cfg)
    return build_error_feedback(codec_spec(cfg), codec) is not None or cfg.dpsgd


def build_layout(cfg: RunConfig, num_examples: Callable[[int], int] | None = None) -> PackedLayout | None:
    """The packed layout for ``virtual-clients`` > 0; ``None``: one SuperNode per client."""
    if not cfg.virtual_clients:
        return None
    return PackedLayout(cfg.virtual_clients, sticky=clients_keep_state(cfg), num_examples=num_examples)


def build_strategy(
    cfg: RunConfig,
    run_dir: Path | None = None,
    *,
    num_examples: Callable[[int], int] | None = None,
) -> PollenStrategy:
    """The run's strategy; with DP on, its ledger goes to ``<run_dir>/privacy/ledger.jsonl``.

    ``num_examples`` (client id → examples) balances the packed layout's shares.
    """
    privacy = None
    codec = build_codec_for(cfg)
    if cfg.dp != "off":
        privacy = PrivateAggregation(
            dp_spec(cfg),
            clients_per_round=cfg.clients_per_round,
            seed=cfg.seed,
            ledger_path=None if run_dir is None else PrivacyLedger.for_run(run_dir).path,
            codec_tolerance=0.0 if codec.lossless else LOSSY_CODEC_NORM_TOLERANCE,
        )
    return PollenStrategy(
        optimizer=build_server_optimizer(server_optimizer_spec(cfg)),
        clients_per_round=cfg.clients_per_round,
        seed=cfg.seed,
        fraction_evaluate=cfg.fraction_evaluate,
        codec=codec,
        limits=update_limits(cfg),
        min_replies=cfg.min_replies,
        privacy=privacy,
        layout=build_layout(cfg, num_examples),
    )


def build_virtual_clock(cfg: RunConfig, node_ids: Iterable[int]) -> VirtualClock | None:
    """The run's virtual clock over these nodes, or ``None`` with ``virtual-clock=false``."""
    if not cfg.virtual_clock:
        return None
    spec = ClockSpec(
        sigma=cfg.straggler_sigma,
        straggler_fraction=cfg.straggler_fraction,
        straggler_slowdown=cfg.straggler_slowdown,
    )
    return VirtualClock(spec, cfg.seed, node_ids)


def build_async_driver(
    cfg: RunConfig, strategy: PollenStrategy, clock: VirtualClock | None
) -> AsyncDriver:
    """The ``driver=async`` loop around ``strategy``'s optimizer and codec."""
    return AsyncDriver(
        strategy,
        concurrency=cfg.concurrency,
        policy=StalenessPolicy(
            max_staleness=cfg.max_staleness,
            weighting=cfg.staleness_weighting,
            exponent=cfg.staleness_exponent,
        ),
        clock=clock,
        timeout=cfg.round_timeout,
    )
