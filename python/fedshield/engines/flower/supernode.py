"""A site's SuperNode with a short idle poll (``fedshield site supernode``).

Flower 1.30's SuperNode asks its SuperLink for a message in a loop and, whenever none is
waiting, sleeps a hard-coded 3 s (``flwr.supernode.start_client_internal``). A site is idle
from its reply until the server's next message, so every message step of a run waits up to 3 s
more at every site, whatever the step carries (docs/DEPLOYMENT.md, "Cost of the Flower
engine"). Once a message is taken, the SuperNode looks for its reply every 0.5 s, so every
step waits up to 0.5 s more at every site. This command runs Flower's own SuperNode, with
Flower's own command line, in this process, with the idle sleep cut to ``--idle-poll`` seconds
and the reply wait to :data:`REPLY_POLL`: the loop's module sees a ``time`` whose ``sleep(3)``
and ``sleep(0.5)`` sleep the shorter times (every other sleep is Flower's own). No file of
Flower's changes, and the SuperLink sees one pull request per idle poll instead of one per 3 s
(the reply wait asks nothing of the SuperLink: it looks at the SuperNode's own state).

This relies on how Flower 1.30 wrote the loop, which is no documented interface: it is used
only where this Flower release's loop is the one checked (:data:`UNAVAILABLE` is None: the
release is 1.30, its loop sleeps ``time.sleep(3)`` exactly once and its reply push
``time.sleep(0.5)`` exactly twice). Anywhere else the stock
SuperNode runs unchanged, with a warning that says why.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
import sys
import threading
import time

import flwr

from ...base.errors import FedShieldError, ParameterError
from . import site_executor

# Flower's SuperNode command and its loop's module (flwr 1.30); another release may move them
try:
    from flwr.supernode import start_client_internal as loop
    from flwr.supernode.cli import flower_supernode
except ImportError as exc:
    loop = flower_supernode = None
    MISSING: str | None = f"flwr {flwr.__version__} has no {exc.name or exc}"
else:
    MISSING = None

log = logging.getLogger("fedshield")

FLOWER_IDLE = 3            # what Flower 1.30's SuperNode sleeps when a pull finds nothing
IDLE_POLL = 0.2            # fedshield's: the next step reaches a site within this
FLOWER_REPLY_WAIT = 0.5    # what it sleeps while its ClientApp's reply is not there yet
REPLY_POLL = 0.05          # fedshield's: a reply leaves the site within this
CHECKED_RELEASE = "1.30."
CHECKED_SLEEP = f"time.sleep({FLOWER_IDLE})"
CHECKED_REPLY_SLEEP = f"time.sleep({FLOWER_REPLY_WAIT})"


def unavailable() -> str | None:
    """Why the idle poll cannot be shortened in this Flower release (None: it can)."""
    if MISSING is not None:
        return MISSING
    if not flwr.__version__.startswith(CHECKED_RELEASE):
        return (f"flwr {flwr.__version__} is not the release whose SuperNode loop fedshield "
                f"checked ({CHECKED_RELEASE}x)")
    try:
        source = inspect.getsource(loop.start_client_internal)
        push = inspect.getsource(loop._push_messages)  # pylint: disable=protected-access
    except (AttributeError, OSError, TypeError) as exc:
        return f"flwr {flwr.__version__}'s SuperNode loop cannot be read ({exc})"
    if source.count(CHECKED_SLEEP) != 1 or getattr(loop, "time", None) is not time:
        return (f"flwr {flwr.__version__}'s SuperNode loop does not sleep {CHECKED_SLEEP} "
                "once, as the checked release does")
    if push.count(CHECKED_REPLY_SLEEP) != 2 or source.count(CHECKED_REPLY_SLEEP):
        return (f"flwr {flwr.__version__}'s SuperNode does not wait for replies with "
                f"{CHECKED_REPLY_SLEEP} twice, as the checked release does")
    return None


UNAVAILABLE: str | None = unavailable()


class IdleSleep:
    """``time`` as the SuperNode loop's module sees it: ``sleep(FLOWER_IDLE)`` sleeps
    ``idle`` seconds instead, ``sleep(FLOWER_REPLY_WAIT)`` REPLY_POLL; everything else is the
    ``time`` module's."""

    def __init__(self, idle: float) -> None:
        self.idle = idle

    def sleep(self, seconds: float) -> None:
        shorter = {FLOWER_IDLE: self.idle, FLOWER_REPLY_WAIT: REPLY_POLL}
        time.sleep(shorter.get(seconds, seconds))

    def __getattr__(self, name: str):
        return getattr(time, name)


def shorten_idle_poll(idle: float) -> bool:
    """Cuts the SuperNode loop's idle sleep to ``idle`` seconds in this process; False (the
    stock loop stays) where this Flower release is not the checked one."""
    if isinstance(idle, bool) or not isinstance(idle, (int, float)) \
            or not 0 < idle <= FLOWER_IDLE:
        raise ParameterError(f"--idle-poll {idle!r}: expected seconds in (0, {FLOWER_IDLE}]")
    if UNAVAILABLE is not None:
        return False
    loop.time = IdleSleep(float(idle))
    return True


def executor_address(flower_args: list[str]) -> str:
    """The SuperNode's ClientAppIo address among Flower's arguments, for an executor in this
    process: the SuperNode must hand its tasks out (``--isolation process``) on loopback (the
    executor speaks to it without TLS)."""
    args = list(flower_args)
    if "--isolation" not in args or args[args.index("--isolation") + 1:][:1] != ["process"]:
        raise ParameterError("--executor needs `--isolation process` among flower-supernode's "
                             "arguments (the SuperNode then hands its tasks to the executor)")
    flag = "--clientappio-api-address"
    value = args[args.index(flag) + 1] if flag in args[:-1] else None
    if value is None:
        raise ParameterError(f"--executor needs {flag} HOST:PORT among flower-supernode's "
                             "arguments")
    host = value.rsplit(":", 1)[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ParameterError(f"--executor: {flag} {value} is not a loopback address; start "
                             "`fedshield site executor --root-certificates PEM` beside the "
                             "SuperNode instead")
    return value


def main(flower_args: list[str], idle: float | None = None, executor: bool = False) -> int:
    """``fedshield site supernode [--idle-poll S] [--executor] -- FLOWER-SUPERNODE-ARGS``:
    Flower's SuperNode, with its own arguments, polling every ``idle`` seconds (default
    :data:`IDLE_POLL`) while idle; ``executor``: with fedshield's executor
    (fedshield.engines.flower.site_executor) taking its tasks from a thread of this process,
    one process per site instead of two."""
    idle = IDLE_POLL if idle is None else idle
    if MISSING is not None:
        raise FedShieldError(f"fedshield site supernode: {MISSING}; start Flower's own "
                             "flower-supernode instead")
    if executor:
        if site_executor.UNAVAILABLE is not None:
            raise FedShieldError(f"fedshield site supernode --executor: "
                                 f"{site_executor.UNAVAILABLE}")
        address = executor_address(flower_args)
        threading.Thread(target=site_executor.serve, args=(address,), name="executor",
                         daemon=True).start()   # ends with the SuperNode's process
    if shorten_idle_poll(idle):
        log.info("fedshield supernode: flwr %s, idle poll %.2f s (Flower's own: %d s)",
                 flwr.__version__, idle, FLOWER_IDLE)
    else:
        log.warning("fedshield supernode: %s; the stock SuperNode runs (idle poll %d s)",
                    UNAVAILABLE, FLOWER_IDLE)
    logging.getLogger("flwr").propagate = False   # Flower prints its own lines once
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
    return 0


__all__ = ["FLOWER_IDLE", "FLOWER_REPLY_WAIT", "IDLE_POLL", "REPLY_POLL", "IdleSleep",
           "UNAVAILABLE", "executor_address", "main", "shorten_idle_poll", "unavailable"]
