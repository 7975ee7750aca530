"""Per-tensor L1 pruning and the paper's schedule."""

import pytest
import torch
import torch.nn.utils.prune as tprune

import fedshield as fs
from fedshield.fl.schedule import prune_ratio
from fedshield.pruning import apply_mask, kept_fraction, l1_mask


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (1, 1023), (4097, 8)])
@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.5, 0.37, 1.0])
def test_l1_mask_matches_torch_prune(shape, ratio):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g)
    mask = l1_mask({"w": w}, ratio)["w"]
    n_pruned = int(round(ratio * w.numel()))
    assert int((~mask).sum()) == n_pruned
    if 0 < n_pruned < w.numel():
        assert w[mask].abs().min() >= w[~mask].abs().max()
    # torch.nn.utils.prune is the paper's reference implementation.
    lin = torch.nn.Linear(shape[1], shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    tprune.l1_unstructured(lin, "weight", amount=n_pruned)
    assert torch.equal(mask, lin.weight_mask.bool())


def test_ties_are_broken_by_position():
    w = torch.tensor([1.0, -1.0, 1.0, 2.0, -1.0, 0.5])
    mask = l1_mask({"w": w}, 0.5)["w"]  # prunes 0.5 then the two first 1.0s in index order
    assert mask.tolist() == [False, False, True, True, True, False]


def test_schedule_follows_the_paper():
    assert prune_ratio(1, 0.2, 0.5, 1, 10) == pytest.approx(0.2)
    assert prune_ratio(10, 0.2, 0.5, 1, 10) == pytest.approx(0.5)
    assert prune_ratio(50, 0.2, 0.5, 1, 10) == pytest.approx(0.5)
    assert prune_ratio(0, 0.2, 0.5, 1, 10) == 0.0   # before t_start: nothing pruned
    assert [prune_ratio(t, 0.2, 0.5, 40, 200) for t in (1, 39, 40, 120, 200)] == \
        pytest.approx([0.0, 0.0, 0.2, 0.35, 0.5])   # the reference code's schedule
    assert prune_ratio(4, 0.2, 0.5, 1, 7) == pytest.approx(0.2 + 0.3 * 3 / 6)


def _planned_ratios(**flat) -> list[float]:
    """The pruned fraction the Server plans for every round of a run of ``flat`` settings."""
    from fedshield.config import RunConfig
    from fedshield.fl.messages import SiteInfo
    from fedshield.fl.server import Server

    cfg = RunConfig.from_flat(he=False, **flat)
    server = Server(cfg, None, engine="local")
    server.enrol([(p, SiteInfo(party=p, name=f"site-{p}", data="d.jsonl", train_examples=8,
                               eval_examples=2, eval_loss=1.0)) for p in range(cfg.n_sites)])
    return [server.plan(r).prune_ratio for r in range(1, cfg.training.rounds + 1)]


@pytest.mark.parametrize("rounds", [1, 2, 3, 4, 7, 200])
def test_the_default_schedule_reaches_its_target_at_the_runs_last_round(rounds):
    """prune_t_end=0 (the default) is the run's last round, whatever --rounds is."""
    ratios = _planned_ratios(rounds=rounds)
    assert ratios[-1] == pytest.approx(0.5)
    assert ratios[0] == pytest.approx(0.5 if rounds == 1 else 0.2)
    assert all(a < b for a, b in zip(ratios, ratios[1:]))  # rises every round up to the end
    if rounds == 3:
        assert ratios == pytest.approx([0.2, 0.35, 0.5])


def test_an_explicit_schedule_end_is_kept():
    ratios = _planned_ratios(rounds=10, prune_t_start=2, prune_t_end=4, prune_p0=0.1,
                             prune_target=0.7)
    assert ratios == pytest.approx([0.0, 0.1, 0.4, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7])
    assert _planned_ratios(rounds=3, prune="off") == [0.0, 0.0, 0.0]


def test_one_round_schedule_is_the_target_from_its_start():
    assert prune_ratio(1, 0.2, 0.5, 1, 1) == pytest.approx(0.5)
    assert prune_ratio(0, 0.2, 0.5, 1, 1) == 0.0   # before t_start nothing is pruned


def test_apply_mask_zeros_pruned_and_keeps_input():
    w = torch.randn(4, 4)
    original = w.clone()
    mask = l1_mask({"w": w}, 0.5)
    out = apply_mask({"w": w}, mask)["w"]
    assert torch.equal(w, original)
    assert torch.equal(out[mask["w"]], w[mask["w"]]) and (out[~mask["w"]] == 0).all()
    assert kept_fraction(mask) == 0.5


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_bad_ratio(ratio):
    with pytest.raises(fs.ParameterError, match="ratio"):
        l1_mask({"w": torch.ones(3)}, ratio)


def test_non_finite_and_empty_tensors_are_rejected():
    with pytest.raises(fs.ParameterError, match="NaN or Inf"):
        l1_mask({"w": torch.tensor([1.0, float("inf")])}, 0.5)
    with pytest.raises(fs.ParameterError, match="empty"):
        l1_mask({"w": torch.ones(0)}, 0.5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(p0=-0.2), "p0"), (dict(p_target=2.0), "p_target"), (dict(t_start=5, t_end=4), "t_end"),
])
def test_bad_schedule(kwargs, match):
    with pytest.raises(fs.ParameterError, match=match):
        prune_ratio(1, **kwargs)
