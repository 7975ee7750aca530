"""`fedshield site supernode` (fedshield.engines.flower.supernode): Flower's own SuperNode with
its 3 s idle sleep cut short, only on the Flower release whose loop was checked, and the stock
SuperNode anywhere else."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

flwr = pytest.importorskip("flwr")

from flwr.supernode import start_client_internal as loop  # noqa: E402

from fedshield.base.errors import ParameterError  # noqa: E402
from fedshield.engines.flower import supernode  # noqa: E402


def test_only_the_idle_sleep_is_shortened():
    idle = supernode.IdleSleep(0.05)
    start = time.monotonic()
    idle.sleep(supernode.FLOWER_IDLE)          # the loop's idle sleep
    assert time.monotonic() - start < 1.0
    start = time.monotonic()
    idle.sleep(0.3)                            # e.g. its wait for a reply: Flower's own
    assert time.monotonic() - start >= 0.3
    assert idle.monotonic() >= start and idle.time() > 0   # the rest is the time module's


def test_the_checked_release_gets_the_short_poll(monkeypatch):
    if not flwr.__version__.startswith("1.30."):
        pytest.skip(f"flwr {flwr.__version__}: not the checked release")
    assert supernode.UNAVAILABLE is None
    monkeypatch.setattr(loop, "time", loop.time)    # restored after the test
    assert supernode.shorten_idle_poll(0.2) is True
    assert isinstance(loop.time, supernode.IdleSleep) and loop.time.idle == 0.2


@pytest.mark.parametrize("version, sleep, why", [
    ("1.42.0", "time.sleep(3)", "not the release"),
    ("1.30.0", "time.sleep(7)", "does not sleep time.sleep(7) once"),
])
def test_another_release_or_loop_keeps_the_stock_supernode(monkeypatch, version, sleep, why):
    monkeypatch.setattr(flwr, "__version__", version)
    monkeypatch.setattr(supernode, "CHECKED_SLEEP", sleep)
    assert why in supernode.unavailable()
    monkeypatch.setattr(supernode, "UNAVAILABLE", supernode.unavailable())
    monkeypatch.setattr(loop, "time", time)
    assert supernode.shorten_idle_poll(0.2) is False and loop.time is time


@pytest.mark.parametrize("idle", [0, -1.0, 3.5, True, "0.2"])
def test_an_idle_poll_out_of_range_is_refused(idle):
    with pytest.raises(ParameterError, match="--idle-poll"):
        supernode.shorten_idle_poll(idle)


def test_the_command_hands_flowers_own_arguments_to_flowers_supernode():
    done = subprocess.run([sys.executable, "-m", "fedshield.cli", "site", "supernode",
                           "--idle-poll", "0.5", "--", "--help"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "flower-supernode" in done.stdout and "--superlink" in done.stdout
    if supernode.UNAVAILABLE is None:
        assert "idle poll 0.50 s" in done.stderr
