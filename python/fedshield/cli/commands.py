"""`fedshield` command line: run (federated fine-tuning), site (a site's own worker), split
(per-site data files), eval (a saved adapter), report (runs side by side) and bench (headline
figures)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from . import federation as cli_federation
from . import site_check as cli_site_check
from ..config import SECTIONS, Option, RunConfig, options
from ..data.sites import SPLITS, data_set, split_into_sites, write_site_files
from ..base.errors import FedShieldError, ParameterError
from ..run.outcome import EXIT_ERROR, EXIT_INTERRUPTED, exit_code, status_help
from ..run.run_dir import (METRICS, SERVER_STATE, check_out_dir, checkpointed_round,
                      recorded_rounds)

# What the `client` extra brings: a command that needs one of them says to install it.
CLIENT_PACKAGES = {"torch", "transformers", "peft", "safetensors", "openfhe", "tqdm",
                   "matplotlib"}



class _HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" only where it says something: not for None, False or empty
    defaults, required options or positionals, nor where the help text already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.required or not action.option_strings
                or action.default in (None, False, "", argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_option(p: argparse.ArgumentParser, option: Option) -> None:
    """One flag per config field: defaults stay None (= "not given", so --config values
    survive); the help shows the config's own default."""
    flag = _flag(option.flag)
    kwargs = {"dest": option.flag, "default": None}
    if isinstance(option.default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
        kwargs["help"] = f"{option.help} (default: {'on' if option.default else 'off'})"
    elif isinstance(option.default, tuple):
        kwargs.update(action="append", metavar=option.metavar or "VALUE",
                      help=f"{option.help} (repeatable)")
    else:
        shown = option.default if option.default != "" else "none"
        kwargs["help"] = (option.help if "default" in option.help
                          else f"{option.help} (default: {shown})")
        if option.choices is not None:
            kwargs["choices"] = option.choices
        else:
            kwargs["type"] = type(option.default)
    kwargs["help"] = kwargs["help"].replace("%", "%%")
    p.add_argument(flag, **kwargs)


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="federated LoRA fine-tuning (embedded demo by default)",
                       formatter_class=_HelpFormatter,
                       description="Every setting of the run config has a flag here; --config "
                                   "reads them from a TOML or JSON file (flags override it). "
                                   "Ctrl-C or SIGTERM stops a run after saving what is done; "
                                   "--resume DIR continues it.")
    p.add_argument("--config", help="TOML (one table per section) or JSON file of run settings")
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(f"{section} settings", cls.__doc__)
        for option in options():
            if option.section == section:
                _add_option(group, option)
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR after its last checkpointed round, with its "
                        "own config; only --rounds may be given, to extend it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run that --out already holds (its metrics.json, "
                        "checkpoint/, adapter/ and plots/ are removed when the new run starts)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bars")


def _site_parser(sub) -> None:
    p = sub.add_parser("site", help="a site of a Flower federation: its own worker",
                       formatter_class=_HelpFormatter)
    commands = p.add_subparsers(dest="site_command", required=True)
    w = commands.add_parser(
        "worker", formatter_class=_HelpFormatter,
        help="serve this site's key, data and training to its SuperNode's ClientApp",
        description="Runs the site's worker from its site config (TOML, one [site] table: "
                    "node_dir, party_id, data, model, train_fn, metrics, socket, token_file, "
                    "...). It listens on the config's Unix socket and answers only requests "
                    "that prove the relay token; the SuperNode's node config names the socket "
                    "and a copy of the token. Run it under an account the SuperNode's account "
                    "cannot read.")
    w.add_argument("--config", required=True, help="the site config (TOML)")
    w.add_argument("--exit-with", type=int, default=0, metavar="PID",
                   help="exit when process PID exits (0: serve until stopped)")
    w.add_argument("--preload-run", metavar="FILE",
                   help="a run config (JSON: the app's run config, as the server's join carries "
                        "it) whose model and data load at once, while Flower starts; the join "
                        "still decides, and a join for another run loads its own")
    e = commands.add_parser(
        "executor", formatter_class=_HelpFormatter,
        help="answer a SuperNode's messages with fedshield's own relay, in one process",
        description="For a SuperNode started with `--isolation process`: takes its tasks over "
                    "its ClientAppIo API and relays each to the site worker with the relay of "
                    "this fedshield install. The app package the server sent is never run, and "
                    "no process starts per message.")
    e.add_argument("--clientappio-api-address", required=True, metavar="HOST:PORT",
                   help="the SuperNode's --clientappio-api-address")
    tls = e.add_mutually_exclusive_group(required=True)
    tls.add_argument("--root-certificates", metavar="PEM",
                     help="CA certificate(s) of the SuperNode's ClientAppIo TLS")
    tls.add_argument("--insecure", action="store_true",
                     help="plaintext to the SuperNode (loopback on the same machine only)")
    s = commands.add_parser(
        "supernode", formatter_class=_HelpFormatter,
        help="start Flower's SuperNode, polling for the next message every --idle-poll s",
        description="Runs Flower's own SuperNode with the arguments after `--` (those of "
                    "flower-supernode). Flower 1.30's SuperNode sleeps 3 s whenever its "
                    "SuperLink has no message for it, so every message step of a run waits "
                    "up to 3 s more; here that sleep is --idle-poll seconds. Where the Flower "
                    "release is not the one fedshield checked, the stock SuperNode runs, with "
                    "a warning.")
    s.add_argument("--idle-poll", type=float, default=None, metavar="SECONDS",
                   help="seconds between two pulls while no message waits (default: 0.2; "
                        "Flower's own: 3)")
    s.add_argument("--executor", action="store_true",
                   help="also take the SuperNode's tasks in this process, as `fedshield site "
                        "executor --insecure` would (one process per site instead of two): "
                        "needs `--isolation process` and a loopback "
                        "--clientappio-api-address among Flower's arguments")
    s.add_argument("flower_args", nargs=argparse.REMAINDER, metavar="-- FLOWER-SUPERNODE-ARGS",
                   help="flower-supernode's own arguments, after `--`")
    cli_site_check.add_parser(commands, _HelpFormatter)


def _split_parser(sub) -> None:
    p = sub.add_parser("split", help="write per-site data files from one data set",
                       formatter_class=_HelpFormatter)
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' or an instruction-data file (.json, .jsonl, .csv, .parquet)")
    p.add_argument("--sites", type=int, default=3, help="number of sites")
    p.add_argument("--how", default="tasks", choices=SPLITS,
                   help="tasks: each site mostly one task (needs a task field); iid; dirichlet")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--columns", default="", help="FIELD=COLUMN pairs, as for `run`")
    p.add_argument("--examples-per-site", type=int, default=96,
                   help="synthetic data: examples generated per site")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data and the split")
    p.add_argument("--out", required=True, help="directory for site-0.jsonl, site-1.jsonl, ...")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss, perplexity and samples of a saved adapter",
                       formatter_class=_HelpFormatter)
    p.add_argument("--adapter", required=True, help="a PEFT adapter directory (a run's DIR/adapter)")
    p.add_argument("--model", help="base model directory (default: the one the adapter names)")
    p.add_argument("--data", required=True, help="instruction data: .json, .jsonl, .csv, .parquet")
    p.add_argument("--columns", default="", help="FIELD=COLUMN pairs, as for `run`")
    p.add_argument("--max-examples", type=int, default=0, help="evaluate the first N (0 = all)")
    p.add_argument("--max-len", type=int, default=0, help="tokens per example (0 = as trained)")
    p.add_argument("--template", default="auto", choices=("auto", "alpaca", "compact"),
                   help="prompt template (auto = as trained)")
    p.add_argument("--samples", type=int, default=3, help="prompts to answer")
    p.add_argument("--sample-tokens", type=int, default=32, help="tokens per answer")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the model runs (auto: cuda when available)")
    p.add_argument("--json", dest="json_path", help="also write the result to this JSON file")


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="runs side by side: loss curves, bytes and time",
                       formatter_class=_HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="DIR", help="output directories of `fedshield run`")
    p.add_argument("--out", default="runs/report", help="where report.png and report.md go")


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="headline figures: bytes per value, encrypt and aggregate speed",
                       formatter_class=_HelpFormatter)
    p.add_argument("--json", dest="json_path", help="also write the figures to this JSON file")
    p.add_argument("--values", type=int, default=1 << 20,
                   help="LoRA values in the benchmark state")
    p.add_argument("--clients", type=int, default=4, help="updates to aggregate")


def _cmd_run(args) -> int:
    changes = {o.flag: getattr(args, o.flag) for o in options()
               if getattr(args, o.flag) is not None}
    if args.resume:
        return _resume(args, changes)
    config = RunConfig.from_file(args.config) if args.config else RunConfig()
    config = config.replace(**changes, _source="command line")
    # before torch, the model and the keys load: a bad --out costs nothing
    check_out_dir(config.engine.out, overwrite=args.overwrite)
    if config.engine.name == "flower":
        return _run_flower(config, args)
    from ..engines.local import LocalEngine  # noqa: PLC0415 - torch loads only for `run`

    out = config.engine.out

    def work(state: dict) -> dict:
        return _start(LocalEngine(config, show_progress=_show(args), overwrite=args.overwrite),
                      state)

    metrics = _interruptible(work, lambda state: local_interrupted(
        out, state, resume=f"fedshield run --resume {out}"))
    return EXIT_INTERRUPTED if metrics is None else _done(metrics, out)


def _resume(args, changes: dict) -> int:
    """--resume DIR: the run's own config; --rounds alone may change (to extend it)."""
    rounds = changes.pop("rounds", None)
    extra = ["--config"] * bool(args.config) + ["--overwrite"] * args.overwrite
    if changes or extra:
        given = sorted(_flag(k) for k in changes) + extra
        raise ParameterError(f"--resume {args.resume!r} continues the run with its own "
                             f"config (only --rounds may change, to extend it); drop {given}")
    out = args.resume
    if (Path(out) / SERVER_STATE).is_file():   # a Flower run: its sites go on from their state
        return _run_flower(None, args, resume_rounds=rounds)
    from ..engines.local import LocalEngine  # noqa: PLC0415 - torch loads only for `run`

    command = f"fedshield run --resume {out}" + (f" --rounds {rounds}" if rounds else "")

    def work(state: dict) -> dict:
        return _start(LocalEngine.resume(out, show_progress=_show(args), rounds=rounds), state)

    metrics = _interruptible(work, lambda state: local_interrupted(
        out, state, resume=command, resuming=True))
    return EXIT_INTERRUPTED if metrics is None else _done(metrics, out)


def _start(engine, state: dict) -> dict:
    """Runs a set-up engine, noting in ``state`` that its rounds started and how many."""
    state.update(started=True, rounds=engine.cfg.training.rounds)
    return engine.run()


def _show(args) -> bool | None:
    return False if args.no_progress else None


def _done(metrics: dict, out: str) -> int:
    last = metrics["rounds"][-1]
    print(f"done: eval loss {metrics['initial_eval_loss']:.4f} -> {last['eval_loss']:.4f} "
          f"after {len(metrics['rounds'])} rounds; wrote {out}/{METRICS}, "
          f"{out}/adapter/, {out}/plots/")
    return 0


class _StopOnSignals:
    """While active (in the main thread), SIGINT and SIGTERM raise KeyboardInterrupt once: a
    second signal cannot cut short the clean-up the first one started (child processes,
    temporary files). ``signum`` is the signal received, if any."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            raise KeyboardInterrupt

    def __enter__(self) -> "_StopOnSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _interruptible(work: Callable[[dict], dict], explain: Callable[[dict], str]) -> dict | None:
    """``work(state)``'s result; on SIGINT or SIGTERM, None after one line (``explain(state)``)
    on stderr. ``work`` notes in ``state`` how far it got."""
    state: dict = {}
    with _StopOnSignals() as stop:
        try:
            return work(state)
        except KeyboardInterrupt:
            pass
        except FedShieldError:
            if stop.signum is None:  # not a child process that the same signal ended first
                raise
        print(f"fedshield: {explain(state)}", file=sys.stderr)
        return None


def _saved(rounds: int, where: str = "saved") -> str:
    return f"round 1 is {where}" if rounds == 1 else f"rounds 1..{rounds} are {where}"


def local_interrupted(out: str, state: dict, *, resume: str, resuming: bool = False) -> str:
    """What an interrupted local run has saved (its checkpoint, read back) and what next;
    ``state``: whether its rounds had started, and how many it has."""
    done = checkpointed_round(out)
    if not state.get("started"):
        if resuming and done:
            return f"interrupted during set-up; {_saved(done)}; resume with `{resume}`"
        return "interrupted during set-up, before round 1; nothing was saved"
    if done == 0:
        return ("interrupted during round 1; no round was completed, so nothing is saved; "
                "run the same command again")
    rounds = state.get("rounds")
    if rounds is not None and done >= rounds:
        return (f"interrupted after the last round ({done}) while writing the adapter and "
                f"plots; {_saved(done)}; resume with `{resume}` to write them")
    return f"interrupted during round {done + 1}; {_saved(done)}; resume with `{resume}`"


def flower_interrupted(out: str) -> str:
    """What an interrupted Flower run left: its metrics.json and, once a round was recorded,
    the server state --resume goes on from."""
    done, _ = recorded_rounds(out)
    stopped = "of the Flower run; its processes are stopped"
    if not (Path(out) / METRICS).is_file():
        return f"interrupted during set-up {stopped}; nothing was saved"
    if not done:
        return (f"interrupted during round 1 {stopped}; no round was completed: run it again "
                "with --overwrite")
    recorded = _saved(done, f"recorded in {out}/{METRICS}")
    if not (Path(out) / SERVER_STATE).is_file():
        return (f"interrupted during round {done + 1} {stopped}; {recorded}, but no server "
                "state to resume from: run it again with --overwrite")
    return (f"interrupted during round {done + 1} {stopped}; {recorded}; resume with "
            f"`fedshield run --resume {out}`")


def _cmd_site(args) -> int:
    if args.site_command == "check":
        return cli_site_check.run(args)
    if args.site_command == "executor":
        from ..engines.flower.site_executor import main  # noqa: PLC0415 - flwr is optional

        return main(args.clientappio_api_address, args.root_certificates)
    if args.site_command == "supernode":
        from ..engines.flower.supernode import main as supernode  # noqa: PLC0415 - flwr too

        flower_args = list(args.flower_args)
        return supernode(flower_args[1:] if flower_args[:1] == ["--"] else flower_args,
                         idle=args.idle_poll, executor=args.executor)
    from ..engines.flower.site_worker import run_worker  # noqa: PLC0415 - torch loads only here

    return run_worker(args.config, exit_with=args.exit_with, preload_run=args.preload_run)


def _cmd_split(args) -> int:
    examples = data_set(args.data, args.sites, args.examples_per_site, args.seed, args.columns)
    shards = split_into_sites(examples, args.sites, args.how, args.seed, args.alpha,
                              source=args.data)
    for path, shard in zip(write_site_files(shards, args.out), shards):
        print(f"{path}: {len(shard)} examples")
    return 0


def _output_file(path: str | None, flag: str) -> None:
    """Refuses, before any work, an output file that cannot be written where it is asked."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ParameterError(f"{flag} {path!r} is a directory; expected a file path")
    if not target.resolve().parent.is_dir():
        raise ParameterError(f"{flag} {path!r}: the directory {str(target.parent)!r} does "
                             "not exist")


def _cmd_eval(args) -> int:
    _output_file(args.json_path, "--json")
    from ..training.evaluation import evaluate_adapter  # noqa: PLC0415

    result = evaluate_adapter(args.adapter, args.model, args.data, columns=args.columns,
                              max_examples=args.max_examples, max_len=args.max_len or None,
                              template=args.template, samples=args.samples,
                              sample_tokens=args.sample_tokens, device=args.device)
    text = json.dumps(result, indent=2)
    if args.json_path:
        with open(args.json_path, "w") as fh:
            fh.write(text)
    print(text)
    return 0


def _cmd_report(args) -> int:
    from ..run.report import report  # noqa: PLC0415

    result = report(args.runs, args.out)
    print(result["table"], end="")
    print(f"wrote {result['png']} and {result['markdown']}")
    return 0


def _run_flower(config: RunConfig, args, *, resume_rounds: int | None = None) -> int:
    """A Flower run; with ``args.resume``, the recorded one in that directory goes on."""
    from ..engines.flower.launcher import resume_flower, run_flower  # noqa: PLC0415 - flwr only here

    out = args.resume or config.engine.out

    def work(state: dict) -> dict:
        if args.resume:
            return resume_flower(out, show_progress=_show(args), rounds=resume_rounds)
        return run_flower(config, show_progress=_show(args), overwrite=args.overwrite)

    metrics = _interruptible(work, lambda state: flower_interrupted(out))
    if metrics is None:
        return EXIT_INTERRUPTED
    ok = [r for r in metrics["rounds"] if r.get("status") == "ok"]
    last = f"{ok[-1]['eval_loss']:.4f}" if ok else "n/a"
    print(f"done (flower): eval loss {metrics['initial_eval_loss']:.4f} -> {last} after "
          f"{len(ok)}/{len(metrics['rounds'])} rounds, {len(metrics['events'])} exclusions; "
          f"wrote {out}/{METRICS}, {out}/adapter/, {out}/plots/")
    return 0


def _cmd_bench(args) -> int:
    _output_file(args.json_path, "--json")
    from ..run.bench import run_bench  # noqa: PLC0415

    figures = run_bench(n_values=args.values, n_clients=args.clients)
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(figures, fh, indent=2)
    return 0


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted, not when main() first ran:
    main() is called more than once in one process (tests, embedding), and a stream captured
    by an earlier caller may be closed by now."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def add_commands(sub) -> None:
    """Adds every `fedshield` command, with its flags and help, to ``sub`` (what
    ``add_subparsers()`` returns); ``sub.choices`` then maps each name to its parser."""
    _run_parser(sub)
    _site_parser(sub)
    _split_parser(sub)
    _eval_parser(sub)
    _report_parser(sub)
    _bench_parser(sub)
    cli_federation.add_parser(sub, _HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    """The `fedshield` command line that main() parses."""
    parser = argparse.ArgumentParser(prog="fedshield", description=__doc__,
                                     formatter_class=_HelpFormatter,
                                     epilog=status_help())
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # fedshield's own progress at INFO; other libraries (flwr's database set-up...) warnings only
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s",
                        handlers=[_CurrentStderr()])
    logging.getLogger("fedshield").setLevel(logging.INFO)
    try:
        commands = {"run": _cmd_run, "site": _cmd_site, "split": _cmd_split, "eval": _cmd_eval,
                    "report": _cmd_report, "bench": _cmd_bench,
                    "federation": cli_federation.run}
        return commands[args.command](args)
    except FedShieldError as exc:   # its kind decides the status (fedshield.run.outcome)
        print(f"fedshield: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except ImportError as exc:  # e.g. a server-only install asked to train
        missing = (exc.name or "").split(".")[0]
        if missing not in CLIENT_PACKAGES:
            raise
        print(f"fedshield: error: `fedshield {args.command}` needs {missing}, which this "
              "install lacks (a server-only install?): pip install 'fedshield[client]'",
              file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:   # a file fedshield did not wrap: still one line, no traceback
        print(f"fedshield: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:   # outside a run's own handling (set-up, other commands)
        print("fedshield: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
