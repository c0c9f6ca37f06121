import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from flowprobe.theory.tv import tv_monte_carlo, tv_quadrature


def normal_log_pdf(mean, std):
    return lambda x: stats.norm.logpdf(x, mean, std)


@pytest.mark.parametrize("shift", [0.1, 1.0, 3.0])
def test_quadrature_matches_closed_form_for_shifted_normals(shift):
    exact = 2 * special.ndtr(shift / 2) - 1
    tv = tv_quadrature(normal_log_pdf(0, 1), normal_log_pdf(shift, 1), np.array([0.0]))
    assert abs(tv - exact) < 1e-10


def test_quadrature_handles_a_jump_at_a_breakpoint():
    # U(0, 1) lies above N(0.5, 1) on all of [0, 1]: TV = 1 − (Φ(0.5) − Φ(−0.5)).
    exact = 1 - (special.ndtr(0.5) - special.ndtr(-0.5))
    tv = tv_quadrature(stats.uniform().logpdf, normal_log_pdf(0.5, 1), np.array([0.0, 1.0]))
    assert abs(tv - exact) < 1e-10


def test_quadrature_agrees_with_scipy_quad_for_heavy_tails():
    log_p, log_q = stats.cauchy(0.3, 1.2).logpdf, stats.laplace(-0.2, 0.7).logpdf
    reference = 0.5 * integrate.quad(lambda x: abs(np.exp(log_p(x)) - np.exp(log_q(x))), -np.inf, np.inf,
                                     points=None, epsabs=1e-13, limit=500)[0]
    assert abs(tv_quadrature(log_p, log_q, np.array([-0.2])) - reference) < 1e-9


def test_monte_carlo_interval_covers_the_exact_value():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000)
    mc = tv_monte_carlo(stats.norm.logpdf(x), stats.norm.logpdf(x, 1.0))
    exact = 2 * special.ndtr(0.5) - 1
    assert mc.ci[0] <= exact <= mc.ci[1]
    assert mc.ci[1] - mc.ci[0] < 0.01 and mc.samples == 200_000 and mc.level == 0.99


def test_monte_carlo_accepts_tensors():
    a = torch.tensor([0.0, -1.0, -2.0], dtype=torch.float64)
    mc = tv_monte_carlo(a, a - np.log(2))
    assert mc.estimate == pytest.approx(0.5) and mc.stderr == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize(("a", "b", "level", "message"), [
    (np.zeros(3), np.zeros(4), 0.99, "one shape"),
    (np.zeros(1), np.zeros(1), 0.99, "two samples"),
    (np.array([0.0, np.nan]), np.zeros(2), 0.99, "NaN"),
    (np.zeros(3), np.zeros(3), 1.5, "level"),
])
def test_monte_carlo_rejects_bad_input(a, b, level, message):
    with pytest.raises(ValueError, match=message):
        tv_monte_carlo(a, b, level)


def test_quadrature_rejects_nan_density():
    with pytest.raises(ValueError, match="NaN"):
        tv_quadrature(lambda x: np.full(np.shape(x), np.nan), normal_log_pdf(0, 1), np.array([0.0]))
