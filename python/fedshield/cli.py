"""`fedshield` command line: run (federated fine-tuning) and bench (headline figures)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields

from .config import _CHOICES, RunConfig
from .errors import FedShieldError

# Flags of the CLI contract plus the tuning knobs; each maps onto one RunConfig field.
_RUN_FLAGS = ("clients", "rounds", "model", "data", "columns", "split", "dirichlet_alpha",
              "eval_examples", "max_len", "dtype", "keys", "threshold", "dropouts", "prune",
              "algorithm", "engine", "out", "seed", "local_steps", "batch_size", "lora_r",
              "lora_alpha", "lora_dropout", "lora_targets", "lr")
_RUN_FLAGS += ("min_clients", "round_timeout")  # engine=flower


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="federated LoRA fine-tuning (embedded demo by default)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="JSON file of run settings (flags override it)")
    defaults = RunConfig()
    meta = {f.name: f for f in fields(RunConfig)}
    for name in _RUN_FLAGS:
        f = meta[name]
        kwargs = {"help": f.metadata.get("help", ""), "default": None,
                  "dest": name}
        if name in _CHOICES:
            kwargs["choices"] = _CHOICES[name]
        else:
            kwargs["type"] = type(getattr(defaults, name))
        p.add_argument("--" + name.replace("_", "-"), **kwargs)
    p.add_argument("--he", dest="he", action="store_true", default=None,
                   help="encrypt updates with CKKS (default)")
    p.add_argument("--no-he", dest="he", action="store_false",
                   help="plaintext FedAvg baseline, same rounds")
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bars")


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="headline figures: bytes per value, encrypt and aggregate speed")
    p.add_argument("--json", dest="json_path", help="also write the figures to this JSON file")
    p.add_argument("--values", type=int, default=1 << 20,
                   help="LoRA values in the benchmark state")
    p.add_argument("--clients", type=int, default=4, help="updates to aggregate")


def _cmd_run(args) -> int:
    config = RunConfig.from_file(args.config) if args.config else RunConfig()
    changes = {name: getattr(args, name) for name in _RUN_FLAGS + ("he",)
               if getattr(args, name) is not None}
    config = config.replace(**changes)
    if config.engine == "flower":
        return _run_flower(config, args)
    from .runner import run  # noqa: PLC0415 - torch/transformers load only for `run`

    metrics = run(config, show_progress=False if args.no_progress else None)
    last = metrics["rounds"][-1]
    print(f"done: eval loss {metrics['initial_eval_loss']:.4f} -> {last['eval_loss']:.4f} "
          f"after {len(metrics['rounds'])} rounds; wrote {config.out}/metrics.json, "
          f"{config.out}/adapter/, {config.out}/plots/")
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
    _bench_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        return _cmd_run(args) if args.command == "run" else _cmd_bench(args)
    except FedShieldError as exc:
        print(f"fedshield: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
