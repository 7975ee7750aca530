"""`fedshield report DIR...`: several runs side by side (loss, bytes, time) and a summary table."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import RunConfig
from ..base.errors import ParameterError

PHASES = ("train", "prune", "encrypt", "aggregate", "decrypt")


def load_run(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except OSError as exc:
        raise ParameterError(f"{str(run_dir)!r}: cannot read metrics.json ({exc.strerror}); "
                             "expected the output directory of `fedshield run`") from exc
    except ValueError as exc:
        raise ParameterError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(metrics, dict) or not metrics.get("rounds"):
        raise ParameterError(f"{path}: no completed rounds to report")
    return metrics


def label_of(metrics: dict, run_dir: str | Path) -> str:
    """A short label saying what the run was: HE or not, keys, algorithm, DP."""
    parts = [Path(run_dir).name]
    try:  # sectioned configs, and the flat ones of earlier versions
        cfg = RunConfig.from_dict(metrics.get("config") or {})
    except ParameterError:
        return parts[0]
    parts.append(f"HE {cfg.keys.mode}" if cfg.he.enabled else "plaintext")
    parts.append(cfg.training.algorithm)
    if cfg.dp.enabled:
        parts.append(f"DP sigma={cfg.dp.noise}")
    return ", ".join(parts)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _loss(value) -> str:
    """A loss, or "-" where the sites' metrics policy withheld it (none)."""
    return f"{value:.4f}" if value is not None else "-"


def summarize(metrics: dict) -> dict:
    rounds = metrics["rounds"]
    last = rounds[-1]
    summary = {
        "rounds": len(rounds),
        "initial_eval_loss": metrics.get("initial_eval_loss"),
        "final_eval_loss": last["eval_loss"],
        "final_perplexity": last.get("perplexity"),
        "mb_up_per_client_round": _mean(_mean(r["bytes_up"]) for r in rounds) / 1e6,
        "seconds_per_round": sum(sum(r["seconds"].values()) for r in rounds) / len(rounds),
        "crypto_seconds_per_round": sum(sum(v for k, v in r["seconds"].items() if k != "train")
                                        for r in rounds) / len(rounds),
    }
    if "dp" in metrics:
        summary["dp_epsilon"] = metrics["dp"]["epsilon"]
    return summary


def markdown_table(runs: list[tuple[str, dict]]) -> str:
    head = ("| run | rounds | eval loss (start -> end) | perplexity | MB up/client/round "
            "| s/round (crypto) | DP epsilon |")
    lines = [head, "|" + "---|" * 7]
    for label, m in runs:
        s = summarize(m)
        ppl = f"{s['final_perplexity']:.2f}" if s["final_perplexity"] is not None else "-"
        eps = f"{s['dp_epsilon']:.2f}" if "dp_epsilon" in s else "-"
        lines.append(f"| {label} | {s['rounds']} | {_loss(s['initial_eval_loss'])} -> "
                     f"{_loss(s['final_eval_loss'])} | {ppl} "
                     f"| {s['mb_up_per_client_round']:.4f} | {s['seconds_per_round']:.2f} "
                     f"({s['crypto_seconds_per_round']:.3f}) | {eps} |")
    return "\n".join(lines) + "\n"


def report(run_dirs: list[str | Path], out: str | Path) -> dict:
    """Writes OUT/report.png (loss, bytes, time per run) and OUT/report.md; returns paths."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    if not run_dirs:
        raise ParameterError("fedshield report needs at least one run directory")
    runs = [(label_of(m, d), m) for d, m in ((d, load_run(d)) for d in run_dirs)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig, (ax_loss, ax_bytes, ax_time) = plt.subplots(1, 3, figsize=(16, 5))
    width = 0.8 / len(runs)
    for i, (label, m) in enumerate(runs):
        rounds = [r["round"] for r in m["rounds"]]
        xs = ([0] if m.get("initial_eval_loss") is not None else []) + rounds
        ys = ([m["initial_eval_loss"]] if m.get("initial_eval_loss") is not None else []) + \
            [r["eval_loss"] for r in m["rounds"]]
        ax_loss.plot(xs, ys, "o-", label=label)
        offset = [x - 0.4 + width * (i + 0.5) for x in rounds]
        ax_bytes.bar(offset, [_mean(r["bytes_up"]) / 1e6 for r in m["rounds"]],
                     width=width, label=label)
        ax_time.bar(offset, [sum(r["seconds"].values()) for r in m["rounds"]], width=width,
                    label=label)
    ax_loss.set(xlabel="round", ylabel="held-out loss", title="Global eval loss")
    ax_bytes.set(xlabel="round", ylabel="MB", title="Bytes up per client")
    ax_time.set(xlabel="round", ylabel="seconds", title="Time per round (all phases)")
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    for ax in (ax_loss, ax_bytes, ax_time):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    # One legend under the three panels: inside them it would hide the bars.
    handles, labels = ax_loss.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(runs)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 * ((len(runs) + 2) // 3), 1, 1))
    png = out / "report.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    md = out / "report.md"
    md.write_text(markdown_table(runs))
    return {"png": str(png), "markdown": str(md), "table": md.read_text()}
