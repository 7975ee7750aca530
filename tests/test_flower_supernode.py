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


def test_only_the_idle_sleep_and_the_reply_wait_are_shortened():
    idle = supernode.IdleSleep(0.05)
    start = time.monotonic()
    idle.sleep(supernode.FLOWER_IDLE)          # the loop's idle sleep
    assert time.monotonic() - start < 1.0
    start = time.monotonic()
    for _ in range(5):
        idle.sleep(supernode.FLOWER_REPLY_WAIT)    # its wait for a reply
    assert time.monotonic() - start < 5 * supernode.FLOWER_REPLY_WAIT
    start = time.monotonic()
    idle.sleep(0.3)                            # any other sleep: Flower's own
    assert time.monotonic() - start >= 0.3
    assert idle.monotonic() >= start and idle.time() > 0   # the rest is the time module's


def test_the_checked_release_gets_the_short_poll(monkeypatch):
    if not flwr.__version__.startswith("1.30."):
        pytest.skip(f"flwr {flwr.__version__}: not the checked release")
    assert supernode.UNAVAILABLE is None
    monkeypatch.setattr(loop, "time", loop.time)    # restored after the test
    assert supernode.shorten_idle_poll(0.2) is True
    assert isinstance(loop.time, supernode.IdleSleep) and loop.time.idle == 0.2


@pytest.mark.parametrize("version, sleep, reply, why", [
    ("1.42.0", "time.sleep(3)", "time.sleep(0.5)", "not the release"),
    ("1.30.0", "time.sleep(7)", "time.sleep(0.5)", "does not sleep time.sleep(7) once"),
    ("1.30.0", "time.sleep(3)", "time.sleep(0.25)", "wait for replies with time.sleep(0.25)"),
])
def test_another_release_or_loop_keeps_the_stock_supernode(monkeypatch, version, sleep, reply,
                                                           why):
    monkeypatch.setattr(flwr, "__version__", version)
    monkeypatch.setattr(supernode, "CHECKED_SLEEP", sleep)
    monkeypatch.setattr(supernode, "CHECKED_REPLY_SLEEP", reply)
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


@pytest.mark.parametrize("args, match", [
    (["--clientappio-api-address", "127.0.0.1:9094"], "needs `--isolation process`"),
    (["--isolation", "subprocess", "--clientappio-api-address", "127.0.0.1:9094"],
     "needs `--isolation process`"),
    (["--isolation", "process"], "needs --clientappio-api-address HOST:PORT"),
    (["--isolation", "process", "--clientappio-api-address", "10.1.2.3:9094"],
     "10.1.2.3:9094 is not a loopback address; start `fedshield site executor "
     "--root-certificates PEM`"),
])
def test_an_executor_in_the_supernode_needs_process_isolation_on_loopback(args, match):
    with pytest.raises(ParameterError, match=match.replace("(", r"\(")):
        supernode.executor_address(["--insecure", *args])


@pytest.mark.parametrize("address", ["127.0.0.1:9094", "localhost:9094", "[::1]:9094"])
def test_the_executor_takes_the_supernodes_loopback_clientappio_address(address):
    args = ["--isolation", "process", "--clientappio-api-address", address]
    assert supernode.executor_address(args) == address
