"""The run's plots: like compared with like, one colour per phase, legends off the bars."""

from __future__ import annotations

import pytest

from fedshield.run.plots import bytes_figure, plot_run, time_figure

PHASES = ("train", "prune", "encrypt", "aggregate", "decrypt")


def _metrics(rounds: int = 3, clients: int = 3) -> dict:
    return {
        "initial_eval_loss": 5.0,
        "sites": [{"name": f"site-{i}"} for i in range(clients)],
        "rounds": [{"round": r, "clients": list(range(clients)),
                    "train_loss": [4.0 - 0.1 * r] * clients, "eval_loss": 4.0 - 0.1 * r,
                    # uploads differ by client; the download is what every client receives
                    "bytes_up": [1_000_000 + 100_000 * i for i in range(clients)],
                    "bytes_down": 1_050_000,
                    "seconds": {p: 0.5 + 0.1 * i for i, p in enumerate(PHASES)}}
                   for r in range(1, rounds + 1)],
    }


def _bars(ax) -> dict:
    return {c.get_label(): c for c in ax.containers}


def test_each_phase_has_one_colour_in_both_panels():
    fig = time_figure(_metrics())
    ax_all, ax_he = fig.axes
    everything, crypto = _bars(ax_all), _bars(ax_he)
    assert list(everything) == list(PHASES) and list(crypto) == list(PHASES[1:])
    for phase, bars in crypto.items():
        assert bars.patches[0].get_facecolor() == everything[phase].patches[0].get_facecolor(), \
            phase
    colours = {everything[p].patches[0].get_facecolor() for p in PHASES}
    assert len(colours) == len(PHASES)  # and the phases stay apart
    assert bars.patches[0].get_height() == pytest.approx(0.9 * 1e3)  # decrypt, in ms


def test_bytes_compare_one_client_up_with_one_client_down_and_the_legend_covers_no_bar():
    fig = bytes_figure(_metrics(rounds=4))  # in the axes, a legend would sit on a bar here
    (ax,) = fig.axes
    up, down = ax.containers
    assert "one client" in up.get_label() and "each client" in down.get_label()
    assert [p.get_height() for p in up.patches] == pytest.approx([1.1] * 4)  # mean, MB
    assert [p.get_height() for p in down.patches] == pytest.approx([1.05] * 4)
    assert "per client" in ax.get_ylabel()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = fig.legends + ([ax.get_legend()] if ax.get_legend() else [])
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    for patch in up.patches + down.patches:
        assert not box.overlaps(patch.get_window_extent(renderer)), "the legend covers a bar"


def test_plot_run_writes_three_pngs_even_for_a_failed_round(tmp_path):
    metrics = _metrics(rounds=2)
    metrics["rounds"][1].update(bytes_up=[], clients=[], train_loss=[], eval_loss=None)
    paths = plot_run(metrics, tmp_path)
    assert [p.name for p in paths] == ["loss.png", "bytes.png", "time.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
