"""What a new user meets at the command line: help texts."""

from __future__ import annotations

import argparse
import re

import pytest


def _subparsers():
    """(name, parser) of every `fedshield` command, as main() builds them."""
    import fedshield.cli as cli

    parser = argparse.ArgumentParser(prog="fedshield")
    sub = parser.add_subparsers(dest="command")
    for build in (cli._run_parser, cli._split_parser, cli._eval_parser, cli._report_parser,
                  cli._bench_parser):
        build(sub)
    return sorted(sub.choices.items())


@pytest.mark.parametrize("name, parser", _subparsers(), ids=lambda x: x if isinstance(x, str)
                         else "")
def test_help_states_each_default_once(name, parser):
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS):
            continue
        text = formatter._expand_help(action)
        assert text.count("default") <= 1, f"{name} {action.option_strings}: {text}"
        assert "(default: None)" not in text and "(default: )" not in text, text
    page = re.sub(r"\s+", " ", parser.format_help())
    assert "(default: None)" not in page and not re.search(r"\(default: [^)]*\) \(default:", page)


def test_eval_help_names_the_model_default_once():
    page = re.sub(r"\s+", " ", dict(_subparsers())["eval"].format_help())
    assert "base model directory (default: the one the adapter names)" in page
    assert "--samples SAMPLES prompts to answer (default: 3)" in page


def test_dropouts_help_says_a_threshold_is_needed():
    page = re.sub(r"\s+", " ", dict(_subparsers())["run"].format_help())
    assert "needs --threshold T with T <= sites - K, e.g. --clients 3 --threshold 2 " \
           "--dropouts 1" in page
