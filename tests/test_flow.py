"""Analytic tests of the flow-matching math, time samplers, Euler and the Cosmos RF-AB2 sampler."""

import math

import pytest
import torch
from conftest import assert_close_to_ref, fixture

import mimic_video as mv

N = 200_000


def test_interpolation_endpoints_and_target():
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(mv.interpolate(x0, eps, torch.zeros(3)), x0)
    assert torch.equal(mv.interpolate(x0, eps, torch.ones(3)), eps)
    tau = torch.tensor([0.1, 0.5, 0.9])
    x_tau = mv.interpolate(x0, eps, tau)
    # the straight path has constant velocity eps - x0: finite difference recovers it
    d = (mv.interpolate(x0, eps, tau + 1e-3) - x_tau) / 1e-3
    torch.testing.assert_close(d, mv.velocity_target(x0, eps), atol=1e-3, rtol=1e-3)


def test_flow_loss_mask():
    v, u = torch.zeros(2, 3), torch.ones(2, 3)
    u[1] = 3.0
    assert mv.flow_loss(v, u).mean().item() == pytest.approx(5.0)
    assert mv.flow_loss(v, u, torch.tensor([[1.0], [0.0]])).tolist() == pytest.approx([1.0, 0.0])  # per sample


def test_sigma_tau_roundtrip():
    sigma = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    tau = mv.sigma_to_tau(sigma)
    assert tau[1] == 0.5 and abs(tau[2] - 80 / 81) < 1e-15
    torch.testing.assert_close(mv.tau_to_sigma(tau), sigma)


def _ecdf_gap(samples, cdf, points):
    """Largest gap between the empirical and the analytic CDF at a few points."""
    return max(abs((samples <= p).double().mean().item() - cdf(p)) for p in points)


def test_action_time_uniform_official():
    g = torch.Generator().manual_seed(1)
    t = mv.sample_tau_action_uniform(N, generator=g)
    assert t.min() >= 0.001 and t.max() <= 1.0 and torch.isfinite(t).all()
    assert _ecdf_gap(t, lambda p: (p - 0.001) / 0.999, [0.05, 0.3, 0.5, 0.8, 0.95]) < 0.005


def test_action_time_beta_paper_favours_noise():
    g = torch.Generator().manual_seed(2)
    t = mv.sample_tau_action_beta(N, generator=g)
    assert t.min() >= 0.001 and t.max() <= 1.0 and torch.isfinite(t).all()
    # p(tau) ~ sqrt(tau - 0.001)  =>  CDF ((tau - 0.001) / 0.999)^1.5, mean 0.6 (the noise end)
    assert _ecdf_gap(t, lambda p: ((p - 0.001) / 0.999) ** 1.5, [0.05, 0.3, 0.5, 0.8, 0.95]) < 0.005
    assert t.mean().item() == pytest.approx(0.001 + 0.999 * 0.6, abs=0.005)


def test_video_sigma_official():
    g = torch.Generator().manual_seed(3)
    sigma = mv.sample_video_sigma(N, generator=g)
    tau = mv.sigma_to_tau(sigma)
    assert torch.isfinite(sigma).all() and (tau > 0).all() and (tau < 1).all()
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    lo, hi = math.log(200), math.log(1e5)

    def cdf(s):  # 95% 4 exp(N(0,1)) + 5% log-uniform on [200, 1e5]
        return 0.95 * phi(math.log(s / 4)) + 0.05 * min(max((math.log(s) - lo) / (hi - lo), 0.0), 1.0)

    assert _ecdf_gap(sigma, cdf, [0.5, 2, 4, 10, 50, 300, 5000, 50000]) < 0.005
    # median: 0.95 Phi(ln(s / 4)) = 0.5 -> sigma ~ 4.27, tau_v ~ 0.81: training favours the noisy end,
    # where mimic-video queries the backbone
    z = 0.066  # Phi^-1(0.5 / 0.95)
    assert tau.median().item() == pytest.approx(mv.sigma_to_tau(4 * math.exp(z)), abs=0.003)
    assert (sigma >= 200).double().mean().item() == pytest.approx(0.05 + 0.95 * (1 - phi(math.log(50))), abs=0.003)


def test_logit_normal_paper():
    g = torch.Generator().manual_seed(4)
    t = mv.sample_tau_logit_normal(N, generator=g, mean=1.0, std=0.5)
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    cdf = lambda p: phi((math.log(p / (1 - p)) - 1.0) / 0.5)  # noqa: E731
    assert _ecdf_gap(t, cdf, [0.3, 0.5, 0.7, 0.8, 0.9]) < 0.005


def test_samplers_are_seeded():
    for fn in (mv.sample_video_sigma, mv.sample_tau_action_uniform, mv.sample_tau_action_beta,
               mv.sample_tau_logit_normal):
        a = fn(8, generator=torch.Generator().manual_seed(5))
        b = fn(8, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, b), fn.__name__


@pytest.mark.parametrize("tau_stop,steps", [(0.0, 10), (0.3, 7), (0.9, 1)])
def test_euler_exact_on_straight_field(tau_stop, steps):
    """The conditional field toward one point, v(x, tau) = (x - x0) / tau, is constant along its
    straight path, so Euler is exact: it lands on interpolate(x0, eps, tau_stop)."""
    x0, eps = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    taus = []

    def v(x, tau):
        taus.append(tau.clone())
        return (x - x0) / tau[:, None].double()

    x = mv.euler_integrate(v, eps, num_steps=steps, tau_stop=tau_stop)
    torch.testing.assert_close(x, mv.interpolate(x0, eps, torch.full((4,), tau_stop, dtype=torch.float64)), atol=1e-6,
                               rtol=0)
    assert len(taus) == steps and taus[0][0] == 1.0


def test_euler_constant_field_endpoint():
    c = torch.randn(2, 3)
    x = mv.euler_integrate(lambda x, tau: c, torch.zeros(2, 3), num_steps=10)
    torch.testing.assert_close(x, -c)  # x(0) = x(1) + (0 - 1) * c


def test_karras_schedule_matches_official():
    s = fixture("rf_ab2_sampler.safetensors")
    sigmas = mv.karras_sigmas(35)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (36,)
    assert torch.equal(sigmas, s["sigmas"])
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-1] == pytest.approx(0.002)
    assert torch.all(sigmas[1:] < sigmas[:-1])


def test_rf_ab2_update_rule_matches_official():
    """The update alone, fed the official x and x0 of each step: x_{i+1} = step(x_i, x0_i, x0_{i-1})."""
    s = fixture("rf_ab2_sampler.safetensors")
    sigmas = s["sigmas"]
    xs = [s["eps"] * 80.0] + [s[f"x_after_step{i}"] for i in range(1, 5)]
    x0s = [s[f"x0_pred_step{i}"] for i in range(4)]
    for i in range(4):
        x_next = mv.rf_ab2_step(xs[i], x0s[i], x0s[i - 1] if i else None, sigmas, i)
        assert x_next.dtype == torch.float32
        assert_close_to_ref(x_next, xs[i + 1], 1e-5, f"step {i}")


def test_first_step_is_flow_matching_euler():
    """In tau-space the Euler x0-step is x_tau' = x_tau + (tau' - tau) v."""
    sig = mv.karras_sigmas(35)
    x0, eps = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    s, t = sig[0], sig[1]
    x_sigma = x0 + s * eps
    x_next = mv.rf_ab2_step(x_sigma, x0, None, sig, 0)
    tau_s, tau_t = mv.sigma_to_tau(s), mv.sigma_to_tau(t)
    expected = (1 - tau_s) * x_sigma + (tau_t - tau_s) * (eps - x0)
    torch.testing.assert_close((1 - tau_t) * x_next, expected)
