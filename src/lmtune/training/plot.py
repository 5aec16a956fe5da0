"""The loss curve PNG written beside every adapter."""

from __future__ import annotations

from pathlib import Path


def plot_loss(steps: list[int], losses: list[float], path: str | Path, title: str = "training loss",
              val_steps: list[int] = (), val_losses: list[float] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, marker="o" if len(steps) < 40 else None, linewidth=1.5, label="training")
    if val_steps:
        ax.plot(val_steps, val_losses, marker="s", linewidth=1.5, label="validation")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
