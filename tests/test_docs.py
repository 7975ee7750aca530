"""The README and docs/ say what the code does: every internal link resolves, and every code
example runs, extracted from the files themselves.

The convention, stated in the README's Python API section: a ```python block runs, in order,
in one namespace per file, unless its first line is ``# not run: <reason>`` (visible to the
reader); placeholders (``lora_state``, ``sites``, ``peft_model``, ``send``/``receive``...) come
from :func:`namespace`. A ```toml block loads as a run config (a ``[site]`` one as a site's
config). In a ```bash block every ``fedshield`` command line is parsed by the CLI and its
settings validated (nothing runs);
other shell lines are documentation. A fence without a language is text (output, a tree).
"""

import json
import re
import shlex
import unicodedata
from pathlib import Path

import pytest
import torch

import fedshield as fs
from fedshield.cli import commands as cli
from fedshield.config import RunConfig
from fedshield.fl.site_config import TABLE as SITE_TABLE
from fedshield.fl.site_config import SiteConfig
from fedshield.he.context import Context

from conftest import make_state
from rank_site import tiny_peft, train_steps

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(\s*)```")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a link in a code block is code, not a link)."""
    out, in_code = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        if not in_code:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to -."""
    text = re.sub(r"[`*_]", "", heading.strip()).lower()
    text = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for line in prose_lines(path.read_text()):
        m = re.match(r"^#{1,6} (.+)$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            if n:
                seen[f"{s}-{n}"] = 1
    return set(seen)


def links(path: Path) -> list[str]:
    return [t for line in prose_lines(path.read_text()) for t in LINK.findall(line)]


def test_slug_matches_github():
    assert slug("Installing: wheels and the sdist") == "installing-wheels-and-the-sdist"
    assert slug("A site in its own training loop: `fs.Party`") == \
        "a-site-in-its-own-training-loop-fsparty"
    assert slug("Limitations (honest)") == "limitations-honest"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_internal_links_resolve(doc):
    bad = []
    for target in links(doc):
        if re.match(r"^[a-z]+:", target):        # http(s), mailto: not ours to check
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT)}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not bad, f"{doc.name}: broken links:\n" + "\n".join(bad)


def test_link_checker_catches_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [no anchor](#nowhere)\n"
                    "```\n[in code](ignored.md)\n```\n")
    assert links(page) == ["#title", "missing.md", "#nowhere"]
    assert anchors(page) == {"title"}


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


# --- code blocks -----------------------------------------------------------------------------

LANGUAGES = {"python", "toml", "bash", ""}
NOT_RUN = re.compile(r"^# not run: \S")


def code_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, first line number, dedented source) of every fenced block."""
    blocks, lang, start, indent, body = [], None, 0, "", []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r"^(\s*)```(\S*)", line)
        if m and lang is None:
            lang, start, indent, body = m.group(2), number + 1, m.group(1), []
        elif m:
            blocks.append((lang, start, "\n".join(b[len(indent):] for b in body) + "\n"))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"{path.name}: a fence opened at line {start - 1} never closes"
    return blocks


def _contexts(values):
    for v in values:
        if isinstance(v, Context):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _contexts(v)
        elif isinstance(v, fs.SharedKeys):
            yield v.server_context()


def namespace(tmp_path: Path) -> dict:
    """The placeholders the examples use: tiny LoRA states with very unequal weights, a tiny
    Llama with LoRA, a user's training step, and a transport whose server aggregates what was
    sent under the context that made it."""
    ns: dict = {"fs": fs, "tmp_dir": tmp_path}
    outbox: list = []
    steps = iter(range(1000))

    def receive() -> fs.EncryptedUpdate:
        sent = [fs.EncryptedUpdate.from_bytes(b) for b in outbox]
        outbox.clear()
        ctx = next(c for c in _contexts(list(ns.values()))
                   if c.fingerprint == sent[0].context_fingerprint)
        return fs.aggregate(ctx, sent)

    keys = fs.keygen_shared()
    ns.update(
        lora_state=make_state(0),
        sites=[(make_state(i), n) for i, n in ((1, 120), (2, 45), (3, 30000))],
        num_examples=120, n_examples=30000, rounds=range(1, 3),
        peft_model=tiny_peft(), other_peft_model=tiny_peft(), model=tiny_peft(),
        ctx=keys.client_context(), server_ctx=keys.server_context(),
        train_as_before=lambda model: train_steps(model, seed=next(steps), steps=1),
        send=outbox.append, receive=receive)
    return ns


def _docs_with(lang: str) -> list[Path]:
    return [d for d in DOCS if any(b[0] == lang for b in code_blocks(d))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_block_follows_the_convention(doc):
    for lang, line, src in code_blocks(doc):
        assert lang in LANGUAGES, f"{doc.name}:{line}: ```{lang} is neither run nor documentation"
        if lang == "python" and src.startswith("# not run"):
            assert NOT_RUN.match(src), f"{doc.name}:{line}: '# not run:' needs a reason"


@pytest.mark.parametrize("doc", _docs_with("python"), ids=lambda p: p.name)
def test_python_examples_run(doc, tmp_path):
    ns = namespace(tmp_path)
    for lang, line, src in code_blocks(doc):
        if lang == "python" and not NOT_RUN.match(src):
            exec(compile(src, f"{doc.name}:{line}", "exec"), ns)  # noqa: S102 - our own docs


PARSED_ONLY = {"run", "split", "eval", "report", "bench", "federation", "site"}


def _commands(src: str) -> list[list[str]]:
    """The ``fedshield`` command lines of a shell block, continuations joined."""
    text = re.sub(r"\\\n\s*", " ", src)
    return [shlex.split(line, comments=True)[1:] for line in text.splitlines()
            if line.startswith("fedshield ")]


@pytest.mark.parametrize("doc", _docs_with("bash"), ids=lambda p: p.name)
def test_shell_commands_parse(doc, monkeypatch):
    """Each documented command's flags exist and its run settings validate."""
    checked = []
    monkeypatch.chdir(ROOT)
    parser = cli.build_parser()  # main()'s own: parsed only, no command runs
    for lang, line, src in code_blocks(doc):
        for argv in _commands(src) if lang == "bash" else []:
            # a new subcommand's documented lines need a look at what parsing them checks
            assert argv[:1] and argv[0] in PARSED_ONLY, f"{doc.name}:{line}: fedshield {argv}"
            try:
                args = parser.parse_args(argv)
            except SystemExit as exc:  # argparse refused a flag or a value
                pytest.fail(f"{doc.name}:{line}: `fedshield {shlex.join(argv)}` is refused "
                            f"(status {exc.code})")
            if args.command == "run":  # its settings validate, as `fedshield run` builds them
                changes = {o.flag: getattr(args, o.flag) for o in cli.options()
                           if getattr(args, o.flag) is not None}
                config = RunConfig.from_file(args.config) if args.config else RunConfig()
                config.replace(**changes, _source=f"{doc.name}:{line}")
            checked.append(argv)
    assert checked or not any(lang == "bash" and "fedshield " in src
                              for lang, _, src in code_blocks(doc))


@pytest.mark.parametrize("doc", _docs_with("toml"), ids=lambda p: p.name)
def test_toml_examples_load(doc, tmp_path):
    for n, (lang, line, src) in enumerate(code_blocks(doc)):
        if lang == "toml":
            path = tmp_path / f"block{n}.toml"
            path.write_text(src)
            if src.startswith(f"[{SITE_TABLE}]"):   # a site's own config
                SiteConfig.from_file(path)
            else:
                RunConfig.from_file(path)


def test_shipped_configs_load():
    for path in sorted((ROOT / "examples").glob("*.toml")):
        RunConfig.from_file(path)


def test_the_extractor_sees_blocks_and_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```python\nx = 1\n```\n- item\n\n  ```toml\n  [a]\n  ```\n"
                    "```python\n# not run: needs a GPU\n```\n```bash\nfedshield run \\\n"
                    "  --rounds 2  # two\nls\n```\n")
    blocks = code_blocks(page)
    assert [(b[0], b[1]) for b in blocks] == [("python", 3), ("toml", 8), ("python", 11),
                                              ("bash", 14)]
    assert blocks[1][2] == "[a]\n" and NOT_RUN.match(blocks[2][2])
    assert _commands(blocks[3][2]) == [["run", "--rounds", "2"]]


def test_the_reference_experiment_config_runs(tmp_path):
    """examples/fedshield-llm.toml as the README says to run it, on the tiny model: its own
    settings (LoRA r=32, alpha 64, the paper's unweighted mean, seq len 512...) with the model,
    data and length of the run overridden."""
    config = ROOT / "examples" / "fedshield-llm.toml"
    cfg = RunConfig.from_file(config)
    assert (cfg.data.clients, cfg.training.rounds, cfg.training.local_steps,
            cfg.training.batch_size, cfg.data.max_len) == (3, 200, 10, 16, 512)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (32, 64, 0.05)
    assert (cfg.training.lr, cfg.training.lr_min, cfg.training.algorithm) == (5e-5, 1e-6, "paper")
    assert (cfg.pruning.p0, cfg.pruning.t_start, cfg.pruning.target, cfg.prune_t_end) == \
        (0.2, 40, 0.5, 200)
    out = tmp_path / "run"
    rc = cli.main(["run", "--config", str(config), "--model", "tiny", "--data", "synthetic",
                   "--dtype", "fp32", "--rounds", "2", "--local-steps", "1", "--batch-size", "2",
                   "--examples-per-client", "6", "--samples", "0", "--out", str(out),
                   "--no-progress"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and len(metrics["rounds"]) == 2
    assert metrics["config"]["training"]["algorithm"] == "paper"
    assert metrics["config"]["lora"]["r"] == 32 and metrics["config"]["data"]["max_len"] == 512
    assert [r["prune_ratio"] for r in metrics["rounds"]] == [0.0, 0.0]   # pruning from round 40
    assert metrics["server_has_secret_key"] is False
