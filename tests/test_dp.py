"""DP-LoRA baseline: the accountant, clipping and noise, and the runner's --dp-clip/--dp-noise."""

import math

import pytest
import torch

import fedshield as fs
from fedshield.config import RunConfig
from fedshield.dp.accountant import RDP_ORDERS, epsilon_exact, epsilon_rdp, gaussian_delta
from fedshield.dp.noise import clip_and_noise
from fedshield.local_engine import LocalEngine

SMALL = dict(clients=2, rounds=2, examples_per_client=16, local_steps=2,
             batch_size=4, lora_r=4, samples=0, he=False, prune="off")


@pytest.mark.parametrize("sigma, rounds", [(0.7, 1), (1.0, 10), (2.0, 100), (10.0, 200)])
def test_exact_epsilon_inverts_the_gaussian_curve_and_rdp_bounds_it(sigma, rounds):
    delta = 1e-5
    exact = epsilon_exact(sigma, rounds, delta)
    assert gaussian_delta(exact, math.sqrt(rounds) / sigma) == pytest.approx(delta, rel=1e-6)
    rdp = epsilon_rdp(sigma, rounds, delta)
    # RDP is an upper bound of the exact curve, and not a loose one at these settings.
    assert exact <= rdp <= exact * 1.25
    # The improved conversion never exceeds Mironov's plain one on the same orders.
    plain = min(rounds * a / (2 * sigma ** 2) + math.log(1 / delta) / (a - 1) for a in RDP_ORDERS)
    assert rdp <= plain


def test_one_round_matches_the_classical_gaussian_bound():
    # sigma >= sqrt(2 ln(1.25/delta)) / eps guarantees (eps, delta)-DP for eps < 1.
    delta, sigma = 1e-5, 6.0
    classical = math.sqrt(2 * math.log(1.25 / delta)) / sigma
    assert epsilon_exact(sigma, 1, delta) < classical


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    eps = [epsilon_rdp(1.0, t, 1e-5) for t in (1, 2, 4, 8)]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert epsilon_rdp(4.0, 10, 1e-5) < epsilon_rdp(1.0, 10, 1e-5)
    assert epsilon_rdp(1.0, 0, 1e-5) == 0.0 == epsilon_exact(1.0, 0, 1e-5)


@pytest.mark.parametrize("args", [(0.0, 1, 1e-5), (-1.0, 1, 1e-5), (math.inf, 1, 1e-5),
                                  (1.0, -1, 1e-5), (1.0, 1.5, 1e-5), (1.0, 1, 0.0),
                                  (1.0, 1, 1.0)])
def test_accountant_rejects_bad_input(args):
    with pytest.raises(fs.ParameterError):
        epsilon_rdp(*args)
    with pytest.raises(fs.ParameterError):
        epsilon_exact(*args)


def _update(scale):
    g = torch.Generator().manual_seed(3)
    return {"a": torch.randn(64, 8, generator=g) * scale, "b": torch.randn(8, 64, generator=g) * scale}


def test_clipping_bounds_the_norm_and_keeps_the_direction():
    big = _update(10.0)
    out, norm = clip_and_noise(big, clip=1.0, noise_multiplier=0.0)
    new_norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in out.values()))
    assert norm > 1.0 and new_norm == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(out["a"] * norm, big["a"], rtol=1e-4, atol=1e-4)
    small = _update(1e-3)
    out, _ = clip_and_noise(small, clip=1.0, noise_multiplier=0.0)
    assert all(torch.equal(out[k], small[k]) for k in small)


def test_noise_has_the_stated_standard_deviation():
    zeros = {"x": torch.zeros(200_000)}
    out, _ = clip_and_noise(zeros, clip=0.5, noise_multiplier=2.0,
                            generator=torch.Generator().manual_seed(0))
    assert float(out["x"].std()) == pytest.approx(1.0, rel=0.02)
    assert abs(float(out["x"].mean())) < 0.01
    # No generator: OS-seeded, so two calls differ (nobody can replay the noise from a config).
    a, _ = clip_and_noise(zeros, clip=0.5, noise_multiplier=2.0)
    b, _ = clip_and_noise(zeros, clip=0.5, noise_multiplier=2.0)
    assert not torch.equal(a["x"], b["x"])


@pytest.mark.parametrize("kwargs", [dict(clip=0.0, noise_multiplier=1.0),
                                    dict(clip=math.nan, noise_multiplier=1.0),
                                    dict(clip=1.0, noise_multiplier=-1.0)])
def test_clip_and_noise_rejects_bad_input(kwargs):
    with pytest.raises(fs.ParameterError):
        clip_and_noise(_update(1.0), **kwargs)


@pytest.mark.parametrize("changes", [dict(dp_clip=1.0), dict(dp_noise=1.0),
                                     dict(dp_clip=-1.0, dp_noise=1.0),
                                     dict(dp_clip=1.0, dp_noise=1.0, dp_delta=0.0),
                                     dict(dp_clip=1.0, dp_noise=1.0, algorithm="paper")])
def test_config_rejects_incomplete_or_meaningless_dp(changes):
    with pytest.raises(fs.ParameterError):
        RunConfig.from_flat(**changes)


def test_runner_clips_noises_and_reports_epsilon(tmp_path):
    base = RunConfig.from_flat(**SMALL, out=str(tmp_path / "plain"))
    plain = LocalEngine(base, show_progress=False)
    m_plain = plain.run_round(1)
    # A clip far above the update norm and noise of std 1e-9: the same model as without DP.
    loose = LocalEngine(base.replace(dp_clip=1e3, dp_noise=1e-12), show_progress=False)
    m_loose = loose.run_round(1)
    diff = max(float((loose.global_state[k] - plain.global_state[k]).abs().max())
               for k in plain.global_state)
    assert diff < 1e-6
    assert len(m_loose["update_norm"]) == 2 and min(m_loose["update_norm"]) > 0
    assert m_loose["dp_epsilon"] == pytest.approx(epsilon_rdp(1e-12, 1, 1e-5))
    assert "dp_epsilon" not in m_plain
    # A tight clip: each client's contribution to the model has norm <= clip.
    tight = LocalEngine(base.replace(dp_clip=1e-3, dp_noise=1e-9), show_progress=False)
    start = {k: v.clone() for k, v in tight.global_state.items()}
    tight.run_round(1)
    moved = math.sqrt(sum(float((tight.global_state[k] - start[k]).double().pow(2).sum())
                          for k in start))
    assert 0 < moved <= 1e-3 * 1.0001


def test_run_writes_the_dp_summary(tmp_path):
    cfg = RunConfig.from_flat(**SMALL, dp_clip=0.5, dp_noise=1.2, dp_delta=1e-6, out=str(tmp_path))
    metrics = LocalEngine(cfg, show_progress=False).run()
    dp = metrics["dp"]
    assert dp["rounds"] == 2 and dp["delta"] == 1e-6
    assert dp["epsilon"] == pytest.approx(epsilon_rdp(1.2, 2, 1e-6))
    assert dp["epsilon_exact"] <= dp["epsilon"]
    assert [r["dp_epsilon"] for r in metrics["rounds"]] == sorted(r["dp_epsilon"] for r in metrics["rounds"])
