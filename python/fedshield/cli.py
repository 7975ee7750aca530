"""`fedshield` command line: run (federated fine-tuning), eval (a saved adapter), report (runs
side by side) and bench (headline figures)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields

from .config import _CHOICES, RunConfig
from .errors import FedShieldError, ParameterError

# Flags of the CLI contract plus the tuning knobs; each maps onto one RunConfig field.
_RUN_FLAGS = ("clients", "rounds", "model", "data", "columns", "split", "dirichlet_alpha",
              "eval_examples", "max_len", "dtype", "keys", "threshold", "dropouts", "prune",
              "algorithm", "engine", "out", "seed", "local_steps", "batch_size", "grad_accum",
              "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lr", "lr_min",
              "quantize", "device", "template", "dp_clip", "dp_noise", "dp_delta", "samples",
              "sample_tokens", "examples_per_client", "flood_bits",
              "min_clients", "round_timeout")  # the last two: engine=flower
_RUN_SWITCHES = ("grad_checkpointing",)  # boolean flags: --grad-checkpointing


def _run_parser(sub) -> None:
    # Flags default to None (= "not given", so --config values survive); the help shows
    # RunConfig's own defaults instead.
    p = sub.add_parser("run", help="federated LoRA fine-tuning (embedded demo by default)")
    p.add_argument("--config", help="JSON file of run settings (flags override it)")
    defaults = RunConfig()
    meta = {f.name: f for f in fields(RunConfig)}
    for name in _RUN_FLAGS:
        f = meta[name]
        default = getattr(defaults, name)
        kwargs = {"help": f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%"),
                  "default": None, "dest": name}
        if name in _CHOICES:
            kwargs["choices"] = _CHOICES[name]
        else:
            kwargs["type"] = type(getattr(defaults, name))
        p.add_argument("--" + name.replace("_", "-"), **kwargs)
    p.add_argument("--he", dest="he", action="store_true", default=None,
                   help="encrypt updates with CKKS (default)")
    p.add_argument("--no-he", dest="he", action="store_false",
                   help="plaintext FedAvg baseline, same rounds")
    for name in _RUN_SWITCHES:
        p.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true",
                       default=None, help=meta[name].metadata.get("help", "") + " (default: off)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR after its last checkpointed round (its config)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bars")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss, perplexity and samples of a saved adapter",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", dest="json_path", help="also write the result to this JSON file")


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="runs side by side: loss curves, bytes and time")
    p.add_argument("runs", nargs="+", metavar="DIR", help="output directories of `fedshield run`")
    p.add_argument("--out", default="runs/report", help="where report.png and report.md go")


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="headline figures: bytes per value, encrypt and aggregate speed")
    p.add_argument("--json", dest="json_path", help="also write the figures to this JSON file")
    p.add_argument("--values", type=int, default=1 << 20,
                   help="LoRA values in the benchmark state")
    p.add_argument("--clients", type=int, default=4, help="updates to aggregate")


def _cmd_run(args) -> int:
    changes = {name: getattr(args, name) for name in _RUN_FLAGS + _RUN_SWITCHES + ("he",)
               if getattr(args, name) is not None}
    show = False if args.no_progress else None
    if args.resume:
        if changes or args.config:
            given = sorted(changes) + (["config"] if args.config else [])
            raise ParameterError(f"--resume {args.resume!r} continues the run with its own "
                                 f"config; drop {given}")
        from .runner import resume  # noqa: PLC0415

        metrics = resume(args.resume, show_progress=show)
        out = args.resume
    else:
        config = RunConfig.from_file(args.config) if args.config else RunConfig()
        config = config.replace(**changes)
        if config.engine == "flower":
            return _run_flower(config, args)
        from .runner import run  # noqa: PLC0415 - torch/transformers load only for `run`

        metrics = run(config, show_progress=show)
        out = config.out
    last = metrics["rounds"][-1]
    print(f"done: eval loss {metrics['initial_eval_loss']:.4f} -> {last['eval_loss']:.4f} "
          f"after {len(metrics['rounds'])} rounds; wrote {out}/metrics.json, "
          f"{out}/adapter/, {out}/plots/")
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
    print(f"done (flower): eval loss {metrics['initial_eval_loss']:.4f} -> {last} after "
          f"{len(ok)}/{len(metrics['rounds'])} rounds, {len(metrics['events'])} exclusions; "
          f"wrote {config.out}/metrics.json, {config.out}/adapter/, {config.out}/plots/")
    return 0


def _cmd_bench(args) -> int:
    from .bench import run_bench  # noqa: PLC0415

    figures = run_bench(n_values=args.values, n_clients=args.clients)
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(figures, fh, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedshield", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _eval_parser(sub)
    _report_parser(sub)
    _bench_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        commands = {"run": _cmd_run, "eval": _cmd_eval, "report": _cmd_report,
                    "bench": _cmd_bench}
        return commands[args.command](args)
    except FedShieldError as exc:
        print(f"fedshield: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
