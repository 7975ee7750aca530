"""DP-LoRA baseline: the accountant, clipping and noise, and the runner's --dp-clip/--dp-noise."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import fedshield as fs
from fedshield.config import RunConfig
from fedshield.dp.accountant import RDP_ORDERS, epsilon_exact, epsilon_rdp, gaussian_delta
from fedshield import native
from fedshield.dp.noise import clip_and_noise, grid_step, to_grid
from fedshield.engines.local import LocalEngine

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
    out, _ = clip_and_noise(zeros, clip=0.5, noise_multiplier=2.0)
    # 200k samples: the sample std is within 0.5% of the truth at 3 standard errors
    assert float(out["x"].double().std()) == pytest.approx(1.0, rel=0.01)
    assert abs(float(out["x"].double().mean())) < 5 / math.sqrt(200_000)
    # OS CSPRNG, no seed: two calls differ (nobody can replay the noise from a config)
    a, _ = clip_and_noise(zeros, clip=0.5, noise_multiplier=2.0)
    assert not torch.equal(a["x"], out["x"])


def _chi2_critical(df: int, z: float = 4.75) -> float:
    """The chi-square quantile at p ~ 1e-6 (Wilson-Hilferty): a false alarm in a million."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("s2", [1, 2, 7, 30, 1000])
def test_discrete_gaussian_matches_its_exact_pmf(s2):
    """The native sampler against P(k) = exp(-k^2 / (2 s2)) / sum_j exp(-j^2 / (2 s2)): a
    chi-square test on 200k draws (tails beyond 5 sigma pooled)."""
    n = 200_000
    z = np.zeros(n, dtype=np.int64)
    native.add_discrete_gaussian(z, s2, 2)
    top = math.ceil(5 * math.sqrt(s2))
    ks = np.arange(-top, top + 1)
    weights = np.exp(-ks.astype(np.float64) ** 2 / (2 * s2))
    mass = weights.sum() + 2 * sum(math.exp(-k * k / (2 * s2)) for k in range(top + 1, 20 * top))
    expected = n * weights / mass
    observed = np.array([(z == k).sum() for k in ks], dtype=np.float64)
    tail_obs, tail_exp = n - observed.sum(), n - expected.sum()
    keep = expected >= 5
    pooled_obs = np.append(observed[keep], observed[~keep].sum() + tail_obs)
    pooled_exp = np.append(expected[keep], expected[~keep].sum() + tail_exp)
    stat = float(((pooled_obs - pooled_exp) ** 2 / pooled_exp).sum())
    assert stat < _chi2_critical(len(pooled_obs) - 1), (s2, stat)


def test_discrete_gaussian_at_the_grid_scale():
    """The variance parameter the mechanism uses (2**40 to 2**42): mean 0 and variance s2 within
    5 standard errors over 1M draws; the draws are integers added in place."""
    n, s2 = 1_000_000, 3 * 2 ** 40 + 12345
    base = np.arange(n, dtype=np.int64) - n // 2
    z = base.copy()
    native.add_discrete_gaussian(z, s2, 0)
    noise = (z - base).astype(np.float64)
    assert abs(noise.mean()) < 5 * math.sqrt(s2 / n)
    assert noise.var() == pytest.approx(s2, rel=5 * math.sqrt(2 / n))
    with pytest.raises(fs.ParameterError, match="not in \\[1, 2\\*\\*46\\]"):
        native.add_discrete_gaussian(z, 0, 1)
    with pytest.raises(fs.ParameterError, match="2\\*\\*46"):
        native.add_discrete_gaussian(z, 2 ** 46 + 1, 1)
    with pytest.raises(fs.ParameterError, match="within"):
        native.add_discrete_gaussian(np.array([2 ** 62], dtype=np.int64), 5, 1)
    with pytest.raises(ValueError, match="int64"):
        native.add_discrete_gaussian(np.zeros(4, dtype=np.int32), 5, 1)
    with pytest.raises(ValueError, match="int64"):
        native.add_discrete_gaussian(np.zeros(8, dtype=np.int64)[::2], 5, 1)


def test_released_values_are_exact_grid_points_and_the_sensitivity_is_exact():
    """Values at half a grid step round away from the clipped vector's norm; the integers the
    noise is added to stay within Delta = clip / gamma exactly, the noise is integer, and what
    is released is gamma times an integer (no floating-point noise to exploit)."""
    clip, sigma = 1.0, 0.7
    gamma = grid_step(clip, sigma)
    assert 2 ** 20 <= sigma * clip / gamma < 2 ** 21 and math.log2(gamma).is_integer()
    d = 40_000
    flat = np.full(d, (np.floor(clip / gamma / math.sqrt(d)) + 0.5) * gamma)
    flat *= clip / np.linalg.norm(flat)  # norm exactly clip, every value near a half step
    z, g, s2 = to_grid(flat, 1.0, clip, sigma)
    assert g == gamma and native.squared_norm(z) <= Fraction(clip / gamma) ** 2
    assert np.abs(z * gamma - flat).max() <= 2 * gamma
    assert s2 == math.ceil((Fraction(sigma) * Fraction(clip / gamma)) ** 2)
    out, norm = clip_and_noise({"w": torch.from_numpy(flat * 3)}, clip, sigma)
    assert norm == pytest.approx(3 * clip)
    k = out["w"].double().numpy() / gamma
    # float32 keeps integers below 2**24 exact: those released values are grid points
    small = np.abs(k) < 2 ** 24
    assert small.sum() > d // 2 and np.array_equal(k[small], np.round(k[small]))


@pytest.mark.parametrize("kwargs", [dict(clip=0.0, noise_multiplier=1.0),
                                    dict(clip=math.nan, noise_multiplier=1.0),
                                    dict(clip=1.0, noise_multiplier=-1.0),
                                    dict(clip=1.0, noise_multiplier=1e-15),
                                    dict(clip=1.0, noise_multiplier=math.inf)])
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
    assert "discrete Gaussian" in dp["mechanism"] and "epsilon_exact" not in dp
    assert [r["dp_epsilon"] for r in metrics["rounds"]] == sorted(r["dp_epsilon"] for r in metrics["rounds"])


OPACUS_SETTINGS = [(0.5, 1, 1e-5), (0.8, 50, 1e-3), (1.0, 10, 1e-5), (2.0, 100, 1e-6),
                   (4.0, 1000, 1e-5), (10.0, 5000, 1e-7)]


@pytest.mark.parametrize("sigma, rounds, delta", OPACUS_SETTINGS)
def test_rdp_accountant_agrees_with_opacus(sigma, rounds, delta):
    """Opacus's RDP accountant (full participation, q = 1): on our orders the same epsilon to
    1e-9; on Opacus's own orders, ours (a superset of them) is never larger and within 2%."""
    rdp = pytest.importorskip("opacus.accountants.analysis.rdp")
    orders = list(RDP_ORDERS)
    theirs, _ = rdp.get_privacy_spent(
        orders=orders, rdp=rdp.compute_rdp(q=1.0, noise_multiplier=sigma, steps=rounds,
                                           orders=orders), delta=delta)
    ours = epsilon_rdp(sigma, rounds, delta)
    assert ours == pytest.approx(float(theirs), rel=1e-9)
    from opacus.accountants import RDPAccountant

    default = RDPAccountant.DEFAULT_ALPHAS
    theirs_default, _ = rdp.get_privacy_spent(
        orders=default, rdp=rdp.compute_rdp(q=1.0, noise_multiplier=sigma, steps=rounds,
                                            orders=default), delta=delta)
    assert ours <= float(theirs_default) * (1 + 1e-12)
    assert ours >= 0.98 * float(theirs_default)
