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
    return [_save(loss_figure(metrics), out_dir / "loss.png"),
            _save(bytes_figure(metrics), out_dir / "bytes.png"),
            _save(time_figure(metrics), out_dir / "time.png")]


def loss_figure(metrics: dict):
    """Each site's train loss and the global held-out loss per round."""
    rounds = [r["round"] for r in metrics["rounds"]]
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
    return fig


def bytes_figure(metrics: dict):
    """Bytes per client and round, like with like: one client's upload (the mean over the
    round's clients) beside the download each client receives. The legend sits under the
    axes, where it covers no bar."""
    rounds = [r["round"] for r in metrics["rounds"]]
    up = [sum(r["bytes_up"]) / len(r["bytes_up"]) / 1e6 if r["bytes_up"] else 0.0
          for r in metrics["rounds"]]
    down = [r["bytes_down"] / 1e6 for r in metrics["rounds"]]
    fig, ax = plt.subplots(figsize=(6, 4.4), layout="constrained")
    ax.bar([r - 0.2 for r in rounds], up, width=0.4, label="up: one client's update (mean)")
    ax.bar([r + 0.2 for r in rounds], down, width=0.4, label="down: what each client receives")
    ax.set(xlabel="round", ylabel="MB per client", title="Bytes on the wire per client and round")
    fig.legend(loc="outside lower center", ncol=2, fontsize=8)
    return fig


def time_figure(metrics: dict):
    """Seconds per phase and round, all phases and (on their own scale) the crypto ones, each
    phase in the same colour in both panels. Training dwarfs the crypto phases on small
    models."""
    rounds = [r["round"] for r in metrics["rounds"]]
    phases = list(metrics["rounds"][0]["seconds"]) if metrics["rounds"] else []
    colour = {phase: f"C{i}" for i, phase in enumerate(phases)}
    fig, (ax_all, ax_he) = plt.subplots(1, 2, figsize=(10, 4.4), layout="constrained")
    for ax, shown, unit, scale in (
            (ax_all, phases, "seconds", 1.0),
            (ax_he, [p for p in phases if p != "train"], "milliseconds", 1e3)):
        bottom = [0.0] * len(rounds)
        for phase in shown:
            vals = [r["seconds"][phase] * scale for r in metrics["rounds"]]
            ax.bar(rounds, vals, bottom=bottom, color=colour[phase], label=phase)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set(xlabel="round", ylabel=unit)
    ax_all.set_title("Time per round (all clients)")
    ax_he.set_title("Without training")
    # one legend for both panels (the phases of the right one are a subset of the left's)
    fig.legend(*ax_all.get_legend_handles_labels(), loc="outside lower center",
               ncol=len(phases) or 1, fontsize=8)
    return fig


def _save(fig, path: Path) -> Path:
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
