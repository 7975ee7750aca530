"""`fedshield` command line: run (federated fine-tuning), split (per-site data files), eval (a
saved adapter), report (runs side by side) and bench (headline figures)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import SECTIONS, Option, RunConfig, options
from .data.sites import SPLITS, data_set, split_into_sites, write_site_files
from .errors import FedShieldError, ParameterError

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
                                   "reads them from a TOML or JSON file (flags override it).")
    p.add_argument("--config", help="TOML (one table per section) or JSON file of run settings")
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(f"{section} settings", cls.__doc__)
        for option in options():
            if option.section == section:
                _add_option(group, option)
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR after its last checkpointed round (its config)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bars")


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
    show = False if args.no_progress else None
    if args.resume:
        if changes or args.config:
            given = sorted(changes) + (["config"] if args.config else [])
            raise ParameterError(f"--resume {args.resume!r} continues the run with its own "
                                 f"config; drop {given}")
        from .local_engine import resume  # noqa: PLC0415 - torch loads only for `run`

        metrics = resume(args.resume, show_progress=show)
        out = args.resume
    else:
        config = RunConfig.from_file(args.config) if args.config else RunConfig()
        config = config.replace(**changes, _source="command line")
        if config.engine.name == "flower":
            return _run_flower(config, args)
        from .local_engine import run  # noqa: PLC0415 - torch loads only for `run`

        metrics = run(config, show_progress=show)
        out = config.engine.out
    last = metrics["rounds"][-1]
    print(f"done: eval loss {metrics['initial_eval_loss']:.4f} -> {last['eval_loss']:.4f} "
          f"after {len(metrics['rounds'])} rounds; wrote {out}/metrics.json, "
          f"{out}/adapter/, {out}/plots/")
    return 0


def _cmd_split(args) -> int:
    examples = data_set(args.data, args.sites, args.examples_per_site, args.seed, args.columns)
    shards = split_into_sites(examples, args.sites, args.how, args.seed, args.alpha,
                              source=args.data)
    for path, shard in zip(write_site_files(shards, args.out), shards):
        print(f"{path}: {len(shard)} examples")
    return 0


def _cmd_eval(args) -> int:
    from .evaluation import evaluate_adapter  # noqa: PLC0415

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
    from .report import report  # noqa: PLC0415

    result = report(args.runs, args.out)
    print(result["table"], end="")
    print(f"wrote {result['png']} and {result['markdown']}")
    return 0


def _run_flower(config: RunConfig, args) -> int:
    from .flower.launcher import run_flower  # noqa: PLC0415 - flwr only for this engine

    metrics = run_flower(config, show_progress=False if args.no_progress else None)
    ok = [r for r in metrics["rounds"] if r.get("status") == "ok"]
    last = f"{ok[-1]['eval_loss']:.4f}" if ok else "n/a"
    out = config.engine.out
    print(f"done (flower): eval loss {metrics['initial_eval_loss']:.4f} -> {last} after "
          f"{len(ok)}/{len(metrics['rounds'])} rounds, {len(metrics['events'])} exclusions; "
          f"wrote {out}/metrics.json, {out}/adapter/, {out}/plots/")
    return 0


def _cmd_bench(args) -> int:
    from .bench import run_bench  # noqa: PLC0415

    figures = run_bench(n_values=args.values, n_clients=args.clients)
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(figures, fh, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedshield", description=__doc__,
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _split_parser(sub)
    _eval_parser(sub)
    _report_parser(sub)
    _bench_parser(sub)
    args = parser.parse_args(argv)
    # fedshield's own progress at INFO; other libraries (flwr's database set-up...) warnings only
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("fedshield").setLevel(logging.INFO)
    try:
        commands = {"run": _cmd_run, "split": _cmd_split, "eval": _cmd_eval,
                    "report": _cmd_report, "bench": _cmd_bench}
        return commands[args.command](args)
    except FedShieldError as exc:
        print(f"fedshield: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # e.g. a server-only install asked to train
        missing = (exc.name or "").split(".")[0]
        if missing not in CLIENT_PACKAGES:
            raise
        print(f"fedshield: error: `fedshield {args.command}` needs {missing}, which this "
              "install lacks (a server-only install?): pip install 'fedshield[client]'",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
