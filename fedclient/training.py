"""Local training and evaluation of a PyTorch model on in-memory arrays.

Data sets here are small NumPy arrays (one client's partition), so batches are sliced from
tensors kept on the training device instead of going through a ``DataLoader``: at FL scale
the per-batch Python overhead of a loader dominates the actual compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class LocalTraining:
    """How a client trains in one round."""

    epochs: int = 1
    steps: int = 0  # > 0: exactly this many SGD steps (cycling through reshuffled epochs)
    lr: float = 0.1
    batch_size: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean mini-batch loss over the round
    num_examples: int
    steps: int


def get_params(model: nn.Module) -> Params:
    """The model's state dict as float32 NumPy arrays (copied to host)."""
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True) for k, v in model.state_dict().items()}


def params_delta(model: nn.Module, reference: Params) -> Params:
    """``get_params(model) − reference`` as float32 arrays, without the intermediate copy."""
    return {
        k: np.subtract(v.detach().cpu().numpy(), reference[k], dtype=np.float32)
        for k, v in model.state_dict().items()
    }


def set_params(model: nn.Module, params: Params) -> None:
    """Load NumPy arrays into the model in place (keeps the model on its device)."""
    state = model.state_dict()
    if params.keys() != state.keys():
        raise ValueError(
            f"received arrays {sorted(params)} do not match the model's {sorted(state)}"
        )
    with torch.no_grad():
        for k, v in state.items():
            v.copy_(torch.as_tensor(params[k]))  # copy_ casts to v's dtype and device


def as_tensors(x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(x, dtype=torch.float32, device=device), torch.as_tensor(y, dtype=torch.long, device=device)


def batch_order(n: int, spec: LocalTraining, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches for one round: ``epochs`` reshuffled passes, or exactly ``steps`` batches."""
    batches: list[torch.Tensor] = []
    target = spec.steps if spec.steps > 0 else None
    epochs = 0
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, spec.batch_size):
            batches.append(perm[start : start + spec.batch_size])
            if target is not None and len(batches) == target:
                return batches
        epochs += 1
        if target is None and epochs == spec.epochs:
            return batches


class PlainSGD:
    """``torch.optim.SGD``'s update rule, without the optimizer machinery around it.

    The same operations, in the same order, as ``torch.optim.SGD``'s single-tensor path
    (the one it takes for CPU tensors) with ``dampening=0`` and ``nesterov=False`` — so the
    trained weights are bitwise identical (tested) — but without the per-step hooks,
    profiler ranges, capturable/differentiable checks and per-client construction, which
    cost about as much as the forward and backward pass of a small model on 50 examples.
    That overhead is paid once per mini-batch by every simulated client, so it bounds how
    fast a packed worker can go.
    """

    def __init__(self, params, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self._buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.params):
                grad = p.grad
                if grad is None:
                    continue
                if self.weight_decay != 0:
                    grad = grad.add(p, alpha=self.weight_decay)
                if self.momentum != 0:
                    buf = self._buffers[i]
                    if buf is None:
                        buf = self._buffers[i] = torch.clone(grad).detach()
                    else:
                        buf.mul_(self.momentum).add_(grad, alpha=1)
                    grad = buf
                p.add_(grad, alpha=-self.lr)


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: LocalTraining,
    generator: torch.Generator,
) -> TrainResult:
    """Plain mini-batch SGD on (x, y) in place; optimizer state starts fresh each round.

    The batch losses stay on the device until the end (one host sync per client, not one per
    batch, which matters on a GPU).
    """
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("cannot train on an empty partition")
    optimizer = PlainSGD(
        model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    losses = []
    for idx in batch_order(n, spec, generator):
        idx = idx.to(x.device)
        optimizer.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    mean_loss = float(torch.stack(losses).to(torch.float64).mean())
    return TrainResult(loss=mean_loss, num_examples=n, steps=len(losses))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of the model on (x, y)."""
    model.eval()
    n = int(x.shape[0])
    if n == 0:
        return float("nan"), float("nan")
    loss_sum, correct = 0.0, 0
    for start in range(0, n, batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    return loss_sum / n, correct / n


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU torch generator seeded from integers (seed, round, client id, ...)."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)
