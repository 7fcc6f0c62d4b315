"""Small PyTorch classifiers for simulations, chosen by name from the run config.

Every model is a plain ``nn.Module`` without BatchNorm (Opacus' per-sample gradients
cannot handle batch statistics) and without buffers, so a model's state is exactly its
parameters and FedAvg-style averaging of ``state_dict`` is meaningful. Initialisation is
PyTorch's default, hence reproducible under ``torch.manual_seed``.

``logreg``
    Multinomial logistic regression: flatten, one linear layer.
``mlp``
    The "2NN" of McMahan et al. (2017): flatten, two ReLU hidden layers of
    ``hidden_size`` units, linear output.
``cnn``
    Two 3x3 convolutions (32, 64 channels, ReLU; 2x2 max-pool after the first), an
    adaptive max-pool to 2x2 so that the same network accepts 8x8 digits and 28x28 MNIST,
    then a ReLU hidden layer of ``hidden_size`` units and a linear output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn


class LogisticRegression(nn.Module):
    """Multinomial logistic regression over the flattened input."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.flatten(x))


class MLP(nn.Module):
    """Two-hidden-layer ReLU network over the flattened input."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class SmallCNN(nn.Module):
    """Two-convolution network for ``(C, H, W)`` images with H, W >= 2."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden_size: int) -> None:
        super().__init__()
        if len(input_shape) != 3 or min(input_shape[1:]) < 2:
            raise ValueError(
                f"model 'cnn' needs image input of shape (C, H, W) with H, W >= 2, got "
                f"{tuple(input_shape)}; use 'logreg' or 'mlp' for vector data"
            )
        channels = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


_BUILDERS: dict[str, Callable[[tuple[int, ...], int, int], nn.Module]] = {
    "logreg": lambda shape, classes, _hidden: LogisticRegression(shape, classes),
    "mlp": MLP,
    "cnn": SmallCNN,
}

#: Names accepted by the ``model`` run-config key.
MODELS: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int,
                hidden_size: int = 128) -> nn.Module:
    """Build a freshly initialised classifier.

    Parameters
    ----------
    name : str
        One of :data:`MODELS`.
    input_shape : tuple of int
        Shape of one example, e.g. ``(1, 28, 28)`` or ``(60,)``.
    num_classes : int
        Number of output logits.
    hidden_size : int
        Width of the hidden layers (``mlp``, ``cnn``; ignored by ``logreg``).
    """
    if name not in _BUILDERS:
        raise ValueError(f"model={name!r} is unknown; allowed: {', '.join(MODELS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
    if not input_shape or min(input_shape) < 1:
        raise ValueError(f"input_shape must be non-empty with positive sizes, got {input_shape}")
    return _BUILDERS[name](tuple(input_shape), num_classes, hidden_size)
