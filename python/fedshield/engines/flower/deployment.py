"""Flower processes on one machine: a SuperLink and N SuperNodes on loopback, `flwr run`.

Standard library only (no fedshield imports), so it also runs against other Flower releases
in a bare interpreter. Every process started here is stopped by `Deployment.stop()` (process
groups: the ServerApp and ClientApp processes Flower spawns go with their parents).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

from ...base.private_file import open_private

CONNECTION = "fedshield-loopback"
# A SuperNode whose SuperLink went away keeps trying to reconnect for this long (Flower's
# --max-wait-time; unset, it would try forever), then exits, and the launcher says so.
SUPERNODE_MAX_WAIT = 300


class DeploymentError(RuntimeError):
    """A Flower process died, or the run did not finish in time."""


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string (JSON escapes are valid TOML)


def write_app_project(app_dir: Path, *, name: str, description: str, server_app: str,
                      client_app: str, config: dict, dependencies: tuple[str, ...] = ()) -> Path:
    """The pyproject.toml of a Flower app directory (what `flwr run` packs into a FAB)."""
    lines = [
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", f"name = {_toml_value(name)}", 'version = "1.0.0"',
        f"description = {_toml_value(description)}", 'license = "Apache-2.0"',
        f"dependencies = [{', '.join(_toml_value(d) for d in dependencies)}]", "",
        "[tool.flwr.app]", 'publisher = "fedshield"', "",
        "[tool.flwr.app.components]", f"serverapp = {_toml_value(server_app)}",
        f"clientapp = {_toml_value(client_app)}", "",
        "[tool.flwr.app.config]",
        *(f"{k} = {_toml_value(v)}" for k, v in config.items()),
    ]
    path = Path(app_dir) / "pyproject.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def free_ports(n: int) -> list[int]:
    """``n`` loopback TCP ports free a moment ago (for a SuperLink, its APIs, SuperNodes)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _find_tool(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def flower_tool(name: str) -> str:
    """The path of Flower's command ``name`` (flwr, flower-superlink...): beside this Python
    first, then on PATH; DeploymentError naming the flower extra if neither has it."""
    found = _find_tool(name)
    if not found:
        raise DeploymentError(f"{name} not found: install the flower extra "
                             "(pip install 'fedshield[flower]')")
    return found


def _gave_up(log: Path) -> bool:
    """Whether a SuperNode's log shows it stopped trying to reach its SuperLink."""
    try:
        text = log.read_text(errors="replace")[-4000:]
    except OSError:
        return False
    return "Giving up reconnection" in text   # Flower's retry invoker, at --max-wait-time


# tool -> its --help text, asked once per process and in the background (each costs a
# Python start-up, about 1.5 s on a loaded 2-core machine)
_HELP: dict[str, Future] = {}
_HELP_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="flower-help")


def _help_of(tool: str) -> Future:
    if tool not in _HELP:
        _HELP[tool] = _HELP_POOL.submit(subprocess.run, [tool, "--help"], capture_output=True,
                                        text=True, timeout=120)
    return _HELP[tool]


# What Flower 1.30's commands take, of the flags asked below: known without a `--help` when
# the command is this environment's own (beside this Python, so of the flwr installed here).
KNOWN_FLAGS = {"1.30.": {"flower-superlink": {"--serverappio-api-address": True},
                         "flower-supernode": {"--clientappio-api-address": True,
                                              "--max-wait-time": True}}}


def known_flags(tool: str) -> dict[str, bool]:
    """The flags of ``tool`` this module knows for the installed Flower release ({}: ask)."""
    path = Path(tool)
    if path.parent != Path(sys.executable).parent:
        return {}
    try:
        release = metadata.version("flwr")
    except metadata.PackageNotFoundError:
        return {}
    return next((flags.get(path.name, {}) for prefix, flags in KNOWN_FLAGS.items()
                 if release.startswith(prefix)), {})


def _has_flag(tool: str, flag: str) -> bool:
    """Whether this Flower release's `tool` takes `flag` (their CLIs moved between releases:
    1.30 has --serverappio-api-address/--clientappio-api-address, later ones --host/--port)."""
    known = known_flags(tool)
    if flag in known:
        return known[flag]
    return flag in _help_of(tool).result().stdout


class Deployment:
    """SuperLink + SuperNodes on loopback; a context manager that always cleans up."""

    def __init__(self, work: Path, n_nodes: int, node_configs: list[dict],
                 env: dict | None = None) -> None:
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.n_nodes = n_nodes
        self.node_configs = node_configs
        self.procs: dict[str, subprocess.Popen] = {}
        self.vital: set[str] = set()   # processes whose exit ends the run (check_alive)
        fleet, control, serverappio, *clientappio = free_ports(3 + n_nodes)
        self.fleet, self.control, self.serverappio = fleet, control, serverappio
        self.clientappio = clientappio
        bin_dir = str(Path(sys.executable).parent)
        self.env = {**os.environ, **(env or {}),
                    "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                    "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0"}
        # asked while other processes start (a simulation starts no SuperNode)
        for name in ["flower-superlink"] + ["flower-supernode"] * bool(n_nodes):
            found = _find_tool(name)
            if found and not known_flags(found):
                _help_of(found)

    def _home(self, name: str) -> Path:
        home = self.work / "home" / name
        home.mkdir(parents=True, exist_ok=True)
        return home

    def _start(self, name: str, argv: list[str], home: Path,
               cwd: Path | None = None) -> subprocess.Popen:
        return self.start(name, argv, env={**self.env, "FLWR_HOME": str(home)}, cwd=cwd,
                          vital=name != "flwr-run")

    def start(self, name: str, argv: list[str], *, env: dict | None = None,
              cwd: Path | None = None, vital: bool = False) -> subprocess.Popen:
        """Starts ``argv`` in a session of its own; its output goes to logs/NAME.log (mode
        0600: a log may name a site's files). ``vital``: its exit ends the run
        (:meth:`check_alive`)."""
        fd = open_private(self.logs / f"{name}.log")
        with os.fdopen(fd, "wb") as log_file:
            proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                    env=env or self.env, start_new_session=True,
                                    cwd=str(cwd or self.work))
        self.procs[name] = proc
        if vital:
            self.vital.add(name)
        return proc

    def start_superlink(self, simulation: bool = False, database: Path | None = None) -> None:
        """The SuperLink (again, after it died: the same ports); ``simulation``: Flower's
        simulation runtime (its ServerApp process runs the virtual SuperNodes' ClientApps in
        ray actors; no SuperNode processes); ``database``: its state in that file, which a
        restarted SuperLink takes up."""
        tool = flower_tool("flower-superlink")
        if _has_flag(tool, "--serverappio-api-address"):  # Flower 1.30: one gRPC port per API
            apis = ["--fleet-api-address", f"127.0.0.1:{self.fleet}",
                    "--control-api-address", f"127.0.0.1:{self.control}",
                    "--serverappio-api-address", f"127.0.0.1:{self.serverappio}"]
        else:  # later releases serve every API over HTTP on one --host/--port
            self.fleet = self.control = self.serverappio
            apis = ["--host", "127.0.0.1", "--port", str(self.serverappio)]
        mode = ["--simulation"] if simulation else []
        mode += ["--database", str(database)] if database is not None else []
        self._start("superlink", [tool, "--insecure", *mode, *apis], self._home("superlink"))
        self._wait_for_port(self.control)

    def _wait_for_port(self, port: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.3)
        raise DeploymentError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s; see "
                              f"{self.logs / 'superlink.log'}")

    def node_config_arg(self, config: dict) -> str:
        return " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())

    def start_supernode(self, i: int, cwd: Path | None = None, *,
                        executor: list[str] | None = None,
                        command: list[str] | None = None,
                        isolated: bool = False) -> subprocess.Popen:
        """SuperNode ``i`` with its node config; ``cwd``: its own directory. ``executor``: a
        command that takes the SuperNode's tasks itself (``--isolation process``), started
        beside it with the SuperNode's ClientAppIo address appended; default: Flower starts
        one ClientApp process per message. ``command``: what starts the SuperNode, given
        flower-supernode's arguments (default: flower-supernode itself); ``isolated``: the
        SuperNode hands its tasks out (``--isolation process``) to an executor ``command``
        runs itself (``fedshield site supernode --executor``)."""
        tool = flower_tool("flower-supernode")
        appio = (["--clientappio-api-address", f"127.0.0.1:{self.clientappio[i]}"]
                 if _has_flag(tool, "--clientappio-api-address") else
                 ["--host", "127.0.0.1", "--port", str(self.clientappio[i])])
        retry = (["--max-wait-time", str(SUPERNODE_MAX_WAIT)]
                 if _has_flag(tool, "--max-wait-time") else [])
        isolation = ["--isolation", "process"] if executor or isolated else []
        proc = self._start(f"supernode-{i}", [
            *(command or [tool]), "--insecure", "--superlink", f"127.0.0.1:{self.fleet}", *appio, *retry,
            *isolation, "--node-config", self.node_config_arg(self.node_configs[i])],
            self._home(f"supernode-{i}"), cwd)
        if executor:
            self._start(f"executor-{i}", [*executor, f"127.0.0.1:{self.clientappio[i]}"],
                        self._home(f"supernode-{i}"), cwd)
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if name in self.vital and proc.poll() is not None:
                why = (f" (it could not reach the SuperLink within {SUPERNODE_MAX_WAIT} s)"
                       if name.startswith("supernode") and _gave_up(self.logs / f"{name}.log")
                       else "")
                raise DeploymentError(f"{name} exited with code {proc.returncode}{why}; see "
                                     f"{self.logs / (name + '.log')}")

    def run_app(self, app_dir: Path, timeout: float, on_poll=None,
                federation_config: dict | None = None, run_config: dict | None = None,
                complete=None) -> int:
        """`flwr run` against this SuperLink; returns its exit code. ``federation_config``:
        the simulation runtime's settings (num-supernodes, client-resources-num-cpus, ...);
        ``run_config``: `--run-config` overrides of keys the app declares. ``complete()``:
        True once the run is complete and its output streamed: then `flwr run` is stopped
        (exit code 0) rather than waited for (it polls the SuperLink, seconds later)."""
        home = self._home("cli")
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.control}"\ninsecure = true\n')
        extra = [] if not federation_config else [
            "--federation-config", " ".join(f"{k}={_toml_value(v)}"
                                            for k, v in federation_config.items())]
        if run_config:
            extra += ["--run-config", " ".join(f"{k}={_toml_value(v)}"
                                               for k, v in run_config.items())]
        proc = self._start("flwr-run", [flower_tool("flwr"), "run", str(app_dir), CONNECTION,
                                        "--stream", *extra], home)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise DeploymentError(f"the Flower run did not finish within {timeout:.0f} s; "
                                     f"logs in {self.logs}")
            self.check_alive()
            if on_poll is not None:
                on_poll()
            if complete is not None and complete():
                self.stop(["flwr-run"])
                return 0
            time.sleep(0.5)
        # `flwr run` exits at once when its SuperLink dies: a dead SuperLink (or SuperNode)
        # is the run's failure, even when it died between two polls
        self.check_alive()
        return proc.returncode

    def stop(self, names=None) -> None:
        """SIGTERM to every process group we started (or those of ``names``), SIGKILL after a
        grace period."""
        procs = [p for name, p in self.procs.items() if names is None or name in names]
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # children (flwr-serverapp, flwr-clientapp) share the group
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
