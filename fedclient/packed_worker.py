"""A packed worker: trains its share of the round's virtual clients in place and sums their updates.

In the packed layout (``virtual-clients`` > 0, :mod:`strategies.packed_layout`) a SuperNode
hosts many virtual clients. For each client of its share the worker does what the
one-SuperNode-per-client layout does on the client *and* on the server, with the same code:

1. the client pipeline (:func:`fedclient.pipeline.client_update`) on that client's lazily
   built partition, seeded by ``(seed, round, client id)``, with its private state from a
   per-worker directory;
2. what the server would do with the reply: decode the payload with the same codec (so the
   codec's loss is exactly what the server would see), validate it
   (:func:`strategies.updates.validate_delta`), and with central DP bound it to norm ≤ C
   (:func:`privacy.mechanisms.bound_update`);
3. add it to a float64 running sum, weighted by examples (by 1 with central DP).

It replies once with that sum and a record per client (:class:`~strategies.packed_layout.ShareReport`).

Why it is fast: no Flower message, model or optimizer construction, DataLoader or process
per client — one model object per process (``cached_model``), tensors built once per client
straight from its arrays, and ``worker-threads`` torch threads (1 by default) so that W
workers on W cores do not oversubscribe them. On a GPU the model and each client's tensors
stay on the device; several workers can share one GPU (``client-resources-num-gpus`` < 1).

Client state lives in ``<client-state-dir or $TMPDIR/pollen-client-state>/packed/
worker-<w>-of-<W>/<run-name>/client-<id>.npz``: keyed by the worker's slot, because
clients with state always go to the same slot (``client id mod W``). On one machine that
directory survives a resume; across machines give ``client-state-dir`` on shared storage.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message

from fedclient.components import cached_model, data_spec, federated_data, local_training
from fedclient.device import pick_device
from fedclient.dpsgd_training import DpSgdSpec, with_spent_history
from fedclient.encoding import UpdateEncoder
from fedclient.faults import FaultPlan
from fedclient.pipeline import client_update
from fedclient.state import DirectoryStateStore
from fedclient.training import LocalTraining, as_tensors, seeded_generator
from fedserver.config import RunConfig
from privacy.mechanisms import NormBoundExceeded, bound_update
from simulations.datasets import FederatedData
from strategies import wire
from strategies.aggregation import RunningWeightedSum
from strategies.factory import clients_keep_state, update_limits
from strategies.packed_layout import (
    FAILED,
    OK,
    REJECTED,
    ClientRecord,
    PayloadSizer,
    ShareAssignment,
    ShareReport,
)
from strategies.strategy import to_params
from strategies.updates import (
    UpdateLimits,
    UpdateRejected,
    check_payload_size,
    decode_payload,
    validate_delta,
)

Params = dict[str, np.ndarray]

_SIZER = PayloadSizer()


def state_directory(cfg: RunConfig, assignment: ShareAssignment) -> Path:
    """The directory of this worker slot's client states (see the module docstring)."""
    base = Path(cfg.client_state_dir).expanduser() if cfg.client_state_dir else (
        Path(tempfile.gettempdir()) / "pollen-client-state"
    )
    return base / "packed" / f"worker-{assignment.worker_index}-of-{assignment.num_workers}"


def train_share(
    msg: Message,
    context: Context,
    cfg: RunConfig,
    *,
    encoder: UpdateEncoder,
    transform=None,
    faults: FaultPlan | None = None,
    dpsgd: DpSgdSpec | None = None,
) -> Message:
    """Handle a packed TRAIN message: train every client of the share, reply with the sum.

    Parameters
    ----------
    encoder : UpdateEncoder
        The clients' encoder; its codec also decodes, as the server would.
    transform : callable, optional
        This round's pre-encoding transform (client-side DP clipping).
    faults : FaultPlan, optional
        Simulated faults, decided per (round, client) as in the one-client layout.
    dpsgd : DpSgdSpec, optional
        Sample-level DP-SGD settings for every client.
    """
    started = time.perf_counter()
    assignment = ShareAssignment.from_message(msg)
    if assignment is None:
        raise ValueError("train_share needs a packed TRAIN message (with a 'packed' record)")
    device = pick_device(cfg.device)
    data = federated_data(data_spec(cfg), cfg.virtual_clients)
    model = cached_model(
        cfg.model, tuple(data.input_shape), data.num_classes, cfg.hidden_size, str(device)
    )
    round_config = msg.content[wire.CONFIG]
    server_round = int(round_config.get("server-round", 0))
    sent = to_params(msg.content[wire.ARRAYS])
    bound = None
    if "dp-clip" in round_config:  # central DP: bound each update as the server's DP stage does
        bound = partial(
            bound_update,
            clip=float(round_config["dp-clip"]),
            mode=str(round_config["dp-mode"]),
            where=str(round_config["dp-where"]),
            adaptive=cfg.dp_adaptive,
            codec_tolerance=float(round_config.get("dp-codec-tolerance", 0.0)),
        )
    # With dp-where=client the client's own unclipped bit goes with its update.
    client_bit = round_config.get("dp-where") == "client"
    trainer = _ClientTrainer(
        cfg=cfg,
        model=model,
        data=data,
        device=device,
        sent=sent,
        server_round=server_round,
        encoder=encoder,
        transform=transform,
        faults=faults or FaultPlan(),
        dpsgd=dpsgd,
        bound=bound,
        client_bit=client_bit,
        # Stateless clients (no error feedback, no DP-SGD) skip the per-client disk lookup.
        state_dir=state_directory(cfg, assignment) if clients_keep_state(cfg) else None,
        run_name=cfg.run_name or str(context.run_id),
    )
    total = RunningWeightedSum()
    records = [trainer.run(client_id, total) for client_id in assignment.client_ids]
    report = ShareReport(records, total, worker_time_s=time.perf_counter() - started)
    return Message(report.to_content(), reply_to=msg)


@dataclass
class _ClientTrainer:
    """Everything one round of one worker shares across its clients."""

    cfg: RunConfig
    model: torch.nn.Module
    data: FederatedData
    device: torch.device
    sent: Params
    server_round: int
    encoder: UpdateEncoder
    transform: Callable | None
    faults: FaultPlan
    dpsgd: DpSgdSpec | None
    bound: Callable | None  # central DP: bound_update with this round's C, or None
    client_bit: bool  # dp-where=client: clients send their own unclipped bit
    state_dir: Path | None  # None: the clients keep no state between rounds
    run_name: str
    training: LocalTraining = field(init=False)
    limits: UpdateLimits = field(init=False)

    def __post_init__(self) -> None:
        self.training = local_training(self.cfg)
        self.limits = update_limits(self.cfg)

    def run(self, client_id: int, total: RunningWeightedSum) -> ClientRecord:
        """Train, encode, decode, validate (and DP-bound) one client; add it to ``total``."""
        try:
            payload, header, metrics, untouched = self._train(client_id)
        except Exception as err:  # noqa: BLE001 - as on a SuperNode: a client failure is that client's
            return ClientRecord(
                client_id, FAILED, reason=f"client {client_id} failed: {type(err).__name__}: {err}"
            )
        num_examples = int(metrics.pop(wire.NUM_EXAMPLES))
        record = ClientRecord(
            client_id, OK, num_examples, payload_bytes=_SIZER(payload, header), metrics=metrics
        )
        source = f"client {client_id}"
        try:
            check_payload_size(source, record.payload_bytes, self.sent, self.limits)
            # Unless a simulated fault corrupted it, the payload is this worker's own encoding.
            delta = decode_payload(
                source, payload, header, self.sent, self.encoder.codec, own=untouched
            )
            delta, record.update_norm = validate_delta(source, delta, self.sent, self.limits)
            weight = float(num_examples)
            if self.bound is not None:
                bit = metrics.get("dp_unclipped") if self.client_bit else None
                try:
                    delta, record.unclipped = self.bound(
                        delta, client_unclipped=None if bit is None else bool(bit)
                    )
                except (NormBoundExceeded, ValueError) as err:
                    raise UpdateRejected(f"{source}: {err}") from None
                weight = 1.0
        except UpdateRejected as reason:
            record.status, record.reason = REJECTED, str(reason)
            return record
        total.add(delta, weight)
        return record

    def _train(self, client_id: int) -> tuple[dict, dict, dict[str, float], bool]:
        """Train one client; returns its payload, header, metrics and whether no fault touched it."""
        fault = self.faults.decide(self.server_round, client_id)
        self.faults.before_training(fault)
        part = self.data.partition(client_id)
        x, y = as_tensors(part.x, part.y, self.device)
        store = None if self.state_dir is None else DirectoryStateStore(
            self.state_dir, self.run_name, client_id, durable=False
        )
        state = {} if store is None else store.load(self.server_round)
        if self.dpsgd is not None:  # a re-run round restarts from its old state, not its spending
            state = with_spent_history(state, store.load())
        outcome = client_update(
            self.model,
            self.sent,
            x,
            y,
            self.training,
            seeded_generator(self.cfg.seed, self.server_round, client_id),
            encoder=self.encoder,
            state=state,
            transform=self.transform,
            dpsgd=self.dpsgd,
        )
        if store is not None and (outcome.state or state):
            store.save(outcome.state, self.server_round)
        payload = self.faults.after_training(fault, outcome.payload, self.server_round, client_id)
        metrics = {
            k: float(v) for k, v in outcome.metrics.items() if isinstance(v, (int, float))
        }
        return payload, outcome.header, metrics, payload is outcome.payload
