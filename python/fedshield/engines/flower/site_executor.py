"""The site's own ClientApp executor, for a SuperNode started with ``--isolation process``.

By default a Flower 1.30 SuperNode starts a SuperExec that starts one ``flwr-clientapp``
process per message, which installs the app package (FAB) the SuperLink sent and runs the
ClientApp in it: each message step pays a Python start-up and an unzip on every site (about
2 s on a loaded 2-core machine), and the code that runs is the server operator's. This
executor is one long-lived process that takes the SuperNode's tasks over its ClientAppIo API
and answers each with fedshield's relay (:mod:`fedshield.engines.flower.client_app`) from the
site's own install: the FAB is never unpacked or imported here, so no code from the server
runs on the site, and a message costs no process start.

It speaks Flower's ClientAppIo API through the same flwr modules ``flwr-clientapp`` uses
(imported below). Those are not a documented interface: another Flower release may move
them; then :data:`UNAVAILABLE` says why, and the launcher keeps Flower's own per-message
processes.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import flwr
import grpc
from flwr.app.error import Error
from flwr.common import Message
from flwr.common.constant import ErrorCode, SubStatus

from ...base.errors import FedShieldError
from .client_app import app as relay_app

# What flwr-clientapp uses to talk to its SuperNode (flwr 1.30); another release may move it
try:
    from flwr.common.grpc import create_channel
    from flwr.proto.appio_pb2 import ClaimTaskRequest, PullPendingTasksRequest
    from flwr.proto.clientappio_pb2_grpc import ClientAppIoStub
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_grpc
    from flwr.supercore.interceptors import (AppIoTokenClientInterceptor,
                                             RuntimeVersionClientInterceptor)
    from flwr.supernode.runtime.run_clientapp import (pull_task_input, push_message,
                                                      push_task_output)
    UNAVAILABLE: str | None = None
except ImportError as exc:
    UNAVAILABLE = (f"flwr {flwr.__version__} has no {exc.name or exc} (the executor speaks "
                   "flwr 1.30's ClientAppIo API); use the SuperNode's own ClientApp processes")

log = logging.getLogger("fedshield")

POLL_SECONDS = 0.05    # how often the SuperNode is asked for a task while none is waiting
UNREACHABLE_WARNING = 60.0   # a SuperNode silent this long is logged (once per outage)


def _channel(address: str, root_certificates: bytes | None, token: str | None = None):
    interceptors = [RuntimeVersionClientInterceptor(component_name="flwr-clientapp")]
    if token is not None:
        interceptors.append(AppIoTokenClientInterceptor(token))
    return create_channel(server_address=address, insecure=root_certificates is None,
                          root_certificates=root_certificates, interceptors=interceptors)


def run_task(address: str, token: str, root_certificates: bytes | None) -> None:
    """One claimed task: pull its message and context, relay it, push the reply and the
    task's end (Flower marks the message failed when the relay raised)."""
    channel = _channel(address, root_certificates, token)
    stub = ClientAppIoStub(channel)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_grpc(stub))
    context, status, details = None, SubStatus.FAILED, "the relay failed"
    try:
        heartbeat.start()
        message, context, _run, _fab = pull_task_input(stub)   # the FAB stays unread
        try:
            reply = relay_app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001 - what Flower's own ClientApp process does
            log.error("fedshield executor: the relay failed: %s", exc)
            reason = f"{type(exc)}:<'{exc}'>"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                            reply_to=message)
            details = reason
        push_message(stub, reply, context)
    finally:
        push_task_output(stub=stub, context=context, sub_status=status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        channel.close()


def serve(address: str, *, root_certificates: bytes | None = None,
          stop: threading.Event | None = None) -> None:
    """Takes the tasks of the SuperNode whose ClientAppIo API listens at ``address``, one at
    a time (a SuperNode holds one message at a time), until ``stop`` is set."""
    if UNAVAILABLE is not None:
        raise FedShieldError(UNAVAILABLE)
    stop = stop or threading.Event()
    channel = _channel(address, root_certificates)
    stub = ClientAppIoStub(channel)
    log.info("fedshield executor: taking the tasks of the SuperNode at %s", address)
    silent_since, warned = None, False
    try:
        while not stop.is_set():
            try:
                tasks = stub.PullPendingTasks(PullPendingTasksRequest()).tasks
                if tasks:
                    claimed = stub.ClaimTask(ClaimTaskRequest(task_id=tasks[0].task_id))
                    if claimed.token:
                        run_task(address, claimed.token, root_certificates)
            except grpc.RpcError as exc:   # the SuperNode is starting, restarting or gone
                now = time.monotonic()
                silent_since = now if silent_since is None else silent_since
                if not warned and now - silent_since >= UNREACHABLE_WARNING:
                    log.warning("fedshield executor: the SuperNode at %s has not answered for "
                                "%.0f s (%s); still trying", address, now - silent_since,
                                exc.code())
                    warned = True             # once per outage
                stop.wait(1.0)
                continue
            silent_since, warned = None, False
            if not tasks:
                stop.wait(POLL_SECONDS)
    finally:
        channel.close()


def main(address: str, root_certificates_path: str | None = None) -> int:
    """``fedshield site executor``: serves until SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        root = Path(root_certificates_path).read_bytes() if root_certificates_path else None
    except OSError as exc:
        raise FedShieldError(f"--root-certificates {root_certificates_path}: "
                             f"{exc.strerror or exc}") from None
    started = time.monotonic()
    serve(address, root_certificates=root, stop=stop)
    log.info("fedshield executor: stopped after %.0f s", time.monotonic() - started)
    return 0


__all__ = ["POLL_SECONDS", "UNAVAILABLE", "main", "run_task", "serve"]
