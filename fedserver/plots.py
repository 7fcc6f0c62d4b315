"""Plots of a run's metrics (accuracy and losses per round), written as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_metrics(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Accuracy (left) and train/eval loss (right) against round; ``None`` if no rows."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]

    def series(key: str) -> list[float]:
        return [float("nan") if r.get(key) is None else r[key] for r in rows]

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(rounds, series("accuracy"), marker="o", ms=3)
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.grid(alpha=0.3)
    ax_loss.plot(rounds, series("train_loss"), marker="o", ms=3, label="train loss (clients)")
    ax_loss.plot(rounds, series("eval_loss"), marker="o", ms=3, label="test loss (central)")
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
