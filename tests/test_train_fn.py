"""A site's own training: train-fn ("package.module:function") called by the site worker with
the model and the round's plan; the Trainer callback and wrapper fedshield provides; the
example Trainer site in a real Flower run (2 SuperNodes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fedshield as fs
from fedshield.config import RunConfig
from fedshield.fl.train_fn import TrainFnError, TrainPlan, load_train_fn, run_train_fn
from fedshield.training.hf_trainer import StopAfterSteps, train_round

from rank_site import VOCAB, tiny_peft

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer"


@pytest.fixture
def trainer_site(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import trainer_site

    return trainer_site


def _plan(steps=3, n=10, **kw) -> TrainPlan:
    ids = torch.randint(0, VOCAB, (n, 12), generator=torch.Generator().manual_seed(0))
    return TrainPlan(round=1, lr=1e-2, steps=steps, batch_size=2, grad_accum=1, seed=0,
                     train={"input_ids": ids, "attention_mask": torch.ones_like(ids),
                            "labels": ids}, **kw)


def test_the_callback_stops_a_trainer_after_the_rounds_steps(trainer_site):
    """The example's Trainer asks for 100 epochs; the round stops after exactly 3 steps, and
    only the LoRA weights moved."""
    model = tiny_peft()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    n, metrics = run_train_fn(trainer_site.train, model, _plan(steps=3))
    assert n == 10 and metrics["steps"] == 3.0 and metrics["loss"] > 0
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved and all("lora_" in name for name in moved)
    with pytest.raises(fs.ParameterError, match="steps=0"):
        StopAfterSteps(0)


def test_train_round_on_a_trainer_with_its_own_max_steps(trainer_site, tmp_path):
    """The Trainer's own max_steps still ends a round before the callback would."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = tiny_peft()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2,
                             per_device_train_batch_size=2, report_to=[], save_strategy="no",
                             disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=trainer_site.Rows(_plan().train),
                      data_collator=default_data_collator)
    n, metrics = train_round(trainer, 5)        # max_steps=2 ends it first
    assert (n, metrics["steps"]) == (10, 2.0)


@pytest.mark.parametrize("spec, match", [
    ("no_colon", "must be 'package.module:function'"),
    ("fedshield_no_such_module:f", "cannot import"),
    ("fedshield.base.threads:no_such_function", "has no 'no_such_function'"),
    ("fedshield.base.threads:ENV", "names a str, not a function"),
])
def test_bad_train_fn_names_its_value(spec, match):
    with pytest.raises(fs.ParameterError, match=match):
        load_train_fn(spec)


@pytest.mark.parametrize("result, match", [
    (None, "expected \\(num_examples, metrics\\)"),
    ((0, {"loss": 1.0}), "num_examples=0"),
    ((4, [1.0]), "expected a dict"),
    ((4, {"loss": float("nan")}), "metric 'loss'=nan"),
    ((4, {"acc": 0.5}), "without a training 'loss'"),
])
def test_a_train_fn_that_returns_nonsense_is_refused(result, match):
    with pytest.raises(TrainFnError, match=match):
        run_train_fn(lambda model, plan: result, None, _plan())


def test_what_a_train_fn_gets_or_returns_is_never_in_an_error():
    """A train-fn that raises, or returns an object holding the plan (what
    functools.partial(model, plan) would): the error names types only, never the plan's
    training rows or the site's config; the plan's own repr leaves them out."""
    plan = _plan(site_config={"data": "/srv/site/train.jsonl", "key_file": "/srv/k"})
    rows = str(plan.train["input_ids"][0, :4].tolist())[1:-1]
    assert "/srv" not in repr(plan) and rows not in repr(plan)

    def raises(model, p):
        raise RuntimeError(f"{p.site_config['data']} {p.train['input_ids'].tolist()}")

    for fn in (raises, lambda model, p: p, lambda model, p: (p, {"loss": 1.0}),
               lambda model, p: (3, {"loss": p})):
        with pytest.raises(TrainFnError) as info:
            run_train_fn(fn, None, plan)
        assert "/srv" not in str(info.value) and rows not in str(info.value), str(info.value)


@pytest.mark.slow  # ~70 s; the default suite runs a failing train-fn over Flower (test_flower_site)
def test_trainer_sites_on_flower(tmp_path):
    """Two SuperNodes whose sites train with the example's transformers.Trainer (train_fn in
    their site configs), 2 rounds: every round aggregates both and records each site's own
    metrics (its Trainer's loss, the round's steps: fedshield's own loop reports none), and
    the global adapter moves."""
    pytest.importorskip("flwr")
    from fedshield.engines.flower.launcher import run_flower

    cfg = RunConfig.from_flat(clients=2, rounds=2, local_steps=2, examples_per_client=16,
                              round_timeout=240.0, prune="off", samples=0, engine="flower",
                              out=str(tmp_path / "run"))
    got = run_flower(cfg, node_env={"PYTHONPATH": str(EXAMPLE)},
                     site_settings=[{"train_fn": "trainer_site:train"}] * 2)
    assert [r["status"] for r in got["rounds"]] == ["ok", "ok"] and got["events"] == []
    for r in got["rounds"]:
        assert r["clients"] == [0, 1]
        assert [m["steps"] for m in r["train_metrics"]] == [2.0, 2.0]
        assert r["train_loss"] == [m["loss"] for m in r["train_metrics"]]
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)
