"""What fits FlowerTune's communication budget: derived from measured bytes per LoRA value.

FlowerTune's LLM leaderboard caps a run's communication at 200,000 MB (uploads and
downloads of every sampled client, over the whole run) and runs 200 rounds of Mistral-7B with
LoRA r=32 on q_proj and v_proj. Each challenge samples its own number of clients per round
(the baseline apps' node count x fraction-fit).

Input: the JSON of one `benchmarks/compare.py --json` run (measured: bytes per value up and
down of each row). Output: per row and challenge, the MB of a 200-round run and whether it
fits; every figure of the table is derived (bytes per value x LoRA values x clients x rounds),
only the bytes per value are measured.

  .venv/bin/python benchmarks/compare.py --state llama7b --json runs/compare.json
  .venv/bin/python benchmarks/flowertune_budget.py runs/compare.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BUDGET_MB = 200_000
ROUNDS = 200
# Mistral-7B: 32 layers, hidden 4096, 32 query heads and 8 key/value heads of 128.
LAYERS, HIDDEN, KV_OUT, RANK = 32, 4096, 1024, 32
# (challenge, clients per round): the baseline apps' nodes x fraction-fit.
CHALLENGES = (("general NLP", 20, 0.1), ("finance", 50, 0.1), ("medical", 20, 0.1),
              ("code", 10, 0.2))


def lora_values() -> int:
    """LoRA values of Mistral-7B at r=32 on q_proj (4096 -> 4096) and v_proj (4096 -> 1024)."""
    q = RANK * HIDDEN + HIDDEN * RANK
    v = RANK * HIDDEN + KV_OUT * RANK
    return LAYERS * (q + v)


def budget_rows(rows: list[dict]) -> list[dict]:
    """Adds plaintext fp32 FedAvg (4 bytes per value each way) to the measured rows and derives
    each one's MB per 200-round run for every challenge."""
    n = lora_values()
    table = [{"row": "plaintext fp32 (no encryption)", "up": 4.0, "down": 4.0,
              "measured": False}]
    table += [{"row": r["row"], "up": r["bytes_up_per_value"], "down": r["bytes_down_per_value"],
               "measured": True} for r in rows]
    for t in table:
        per_client_round = (t["up"] + t["down"]) * n / 1e6  # MB
        t["mb"] = {}
        for name, nodes, fraction in CHALLENGES:
            clients = max(1, round(nodes * fraction))
            t["mb"][name] = per_client_round * clients * ROUNDS
        t["rounds_in_budget"] = {name: int(BUDGET_MB // (per_client_round *
                                                         max(1, round(nodes * fraction))))
                                 for name, nodes, fraction in CHALLENGES}
    return table


def print_markdown(table: list[dict]) -> None:
    n = lora_values()
    heads = [f"{name} ({max(1, round(nodes * fraction))}/round)"
             for name, nodes, fraction in CHALLENGES]
    print(f"Mistral-7B, LoRA r={RANK} on q_proj/v_proj: {n:,} values; {ROUNDS} rounds; budget "
          f"{BUDGET_MB:,} MB. MB per run (fits / over; rounds the budget holds):")
    print()
    print("| row | B/value up + down | " + " | ".join(heads) + " |")
    print("|---|---|" + "---|" * len(heads))
    for t in table:
        cells = []
        for name, _, _ in CHALLENGES:
            mb = t["mb"][name]
            ok = "fits" if mb <= BUDGET_MB else f"over, {t['rounds_in_budget'][name]} rounds"
            cells.append(f"{mb:,.0f} ({ok})")
        bpv = f"{t['up']:.2f} + {t['down']:.2f}" + ("" if t["measured"] else " (by definition)")
        print(f"| {t['row']} | {bpv} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("compare_json", type=Path, help="the --json output of benchmarks/compare.py")
    ap.add_argument("--extra", type=Path, action="append", default=[],
                    help="more compare.py JSON files whose rows are added (e.g. an earlier "
                         "version's run)")
    args = ap.parse_args(argv)
    rows = []
    for path in [args.compare_json, *args.extra]:
        try:
            doc = json.loads(path.read_text())
            rows += [dict(r, row=r["row"] + (f" [{path.name}]" if path != args.compare_json
                                             else "")) for r in doc["rows"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"flowertune_budget: cannot read {path}: {exc}", file=sys.stderr)
            return 2
    print_markdown(budget_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
