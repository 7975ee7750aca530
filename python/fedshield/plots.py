"""PNG plots of a run's metrics (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_run(metrics: dict, out_dir: Path) -> list[Path]:
    """Writes loss.png, bytes.png and time.png; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = [r["round"] for r in metrics["rounds"]]
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    parties = sorted({p for r in metrics["rounds"] for p in r.get("clients", [])})
    names = {i: s["name"] for i, s in enumerate(metrics.get("sites", []))}
    for party in parties:  # a party absent from a round leaves a gap
        losses = [dict(zip(r.get("clients", []), r.get("train_loss", []))).get(party, math.nan)
                  for r in metrics["rounds"]]
        ax.plot(rounds, losses, "o--", alpha=0.6, label=f"{names.get(party, party)} train")
    evals = [math.nan if r.get("eval_loss") is None else r["eval_loss"] for r in metrics["rounds"]]
    initial = metrics.get("initial_eval_loss")
    ax.plot([0] + rounds, [math.nan if initial is None else initial] + evals, "k-s",
            label="global eval (sites' mean)")
    ax.set(xlabel="round", ylabel="loss (completion tokens)", title="Loss per round")
    ax.legend(fontsize=8)
    written.append(_save(fig, out_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([r - 0.2 for r in rounds], [sum(r["bytes_up"]) / 1e6 for r in metrics["rounds"]],
           width=0.4, label="up (all clients)")
    ax.bar([r + 0.2 for r in rounds], [r["bytes_down"] / 1e6 for r in metrics["rounds"]],
           width=0.4, label="down (per client)")
    ax.set(xlabel="round", ylabel="MB", title="Bytes on the wire per round")
    ax.legend(fontsize=8)
    written.append(_save(fig, out_dir / "bytes.png"))

    # Training dwarfs the crypto phases on small models: show them again on their own scale.
    fig, (ax_all, ax_he) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, phases, unit, scale in (
            (ax_all, ("train", "prune", "encrypt", "aggregate", "decrypt"), "seconds", 1.0),
            (ax_he, ("prune", "encrypt", "aggregate", "decrypt"), "milliseconds", 1e3)):
        bottom = [0.0] * len(rounds)
        for phase in phases:
            vals = [r["seconds"][phase] * scale for r in metrics["rounds"]]
            ax.bar(rounds, vals, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set(xlabel="round", ylabel=unit)
        ax.legend(fontsize=8)
    ax_all.set_title("Time per round (all clients)")
    ax_he.set_title("Without training")
    written.append(_save(fig, out_dir / "time.png"))
    return written


def _save(fig, path: Path) -> Path:
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
