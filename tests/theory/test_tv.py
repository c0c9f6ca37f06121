"""TV estimators (docs/theory/tv.md): closed forms, exact quadrature, Monte Carlo with coverage-tested intervals."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats
from torch.distributions import Independent, Normal

import flowprobe as fp
from flowprobe.theory.tv import (
    estimate_tv,
    isotropic_normal_tv,
    normal_tv,
    tv_combined,
    tv_exact_1d,
    tv_monte_carlo,
    tv_quadrature,
    tv_sampled,
)

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def normal_log_pdf(mean, std):
    return lambda x: stats.norm.logpdf(x, mean, std)


def normal(mean, std, dim=None):
    """``N(mean, std²)`` on R (scalar events), or ``N(mean·e₁, std² I_dim)`` on R^dim."""
    if dim is None:
        return Normal(torch.tensor(mean, dtype=F64), torch.tensor(std, dtype=F64))
    loc = torch.zeros(dim, dtype=F64)
    loc[0] = mean
    return Independent(Normal(loc, torch.full((dim,), std, dtype=F64)), 1)


# -- closed forms and quadrature ------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0.1, 1.0, 3.0])
def test_quadrature_matches_closed_form_for_shifted_normals(shift):
    exact = 2 * special.ndtr(shift / 2) - 1
    tv = tv_quadrature(normal_log_pdf(0, 1), normal_log_pdf(shift, 1), np.array([0.0]))
    assert abs(tv - exact) < 1e-10
    assert normal_tv(0, 1, shift, 1) == pytest.approx(exact, abs=1e-15)


@pytest.mark.parametrize("pair", [(0.0, 1.0, 0.5, 2.0), (0.0, 1.0, 0.0, math.sqrt(2)), (3.0, 0.2, -1.0, 5.0)])
def test_normal_tv_with_two_scales_matches_quadrature(pair):
    ma, sa, mb, sb = pair
    exact = tv_quadrature(normal_log_pdf(ma, sa), normal_log_pdf(mb, sb), np.array([ma, mb]))
    assert normal_tv(*pair) == pytest.approx(exact, abs=1e-12)
    assert normal_tv(mb, sb, ma, sa) == pytest.approx(exact, abs=1e-12)


@pytest.mark.parametrize("dim, variance", [(1, 2.0), (2, 2.25), (3, 0.5)])
def test_isotropic_normal_tv_matches_radial_quadrature(dim, variance):
    area = 2 * math.pi ** (dim / 2) / math.gamma(dim / 2)  # surface of the unit sphere in R^dim

    def density(r, v):
        return math.exp(-r * r / (2 * v)) / (2 * math.pi * v) ** (dim / 2)

    integral = integrate.quad(lambda r: area * r ** (dim - 1) * abs(density(r, 1) - density(r, variance)), 0, 40,
                              limit=200)[0]
    assert isotropic_normal_tv(dim, variance) == pytest.approx(0.5 * integral, abs=1e-9)
    assert isotropic_normal_tv(1, 2.0) == pytest.approx(0.16606407498, abs=1e-10)  # docs/theory/tv.md §1


def test_closed_forms_reject_bad_parameters():
    with pytest.raises(ValueError, match="positive standard deviations"):
        normal_tv(0, 1, 0, 0)
    with pytest.raises(ValueError, match="positive variance"):
        isotropic_normal_tv(2, -1.0)


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


def test_quadrature_rejects_nan_density():
    with pytest.raises(ValueError, match="NaN"):
        tv_quadrature(lambda x: np.full(np.shape(x), np.nan), normal_log_pdf(0, 1), np.array([0.0]))


# -- exact on R for density objects ----------------------------------------------------------------


def affine_flow(dtype):
    """``f(z) = z + 0.5(z + 0.4) = 1.5z + 0.2`` on ``N(0, 1)``: the push-forward is ``N(0.2, 1.5²)``."""
    layer = fp.Planar(1, "identity").to(dtype)
    layer.set_constrained(torch.tensor([0.5], dtype=dtype), torch.tensor([1.0], dtype=dtype), 0.4)
    return fp.Flow(fp.StandardNormal(1).to(dtype), [layer])


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_exact_tv_of_a_1d_flow_in_its_dtype(dtype, tol):
    truth = normal_tv(0.2, 1.5, 0.0, 1.0)
    target = Normal(torch.tensor(0.0, dtype=dtype), torch.tensor(1.0, dtype=dtype))
    exact = estimate_tv(affine_flow(dtype), target)
    assert exact.method == "quadrature" and exact.estimate.dtype == dtype
    assert abs(float(exact.estimate) - truth) < tol
    assert float(exact.low) <= truth <= float(exact.high) and float(exact.high - exact.low) <= 1.01 * tol


def test_exact_tv_needs_one_dimension():
    with pytest.raises(ValueError, match="d = 1"):
        tv_exact_1d(fp.StandardNormal(2), fp.StandardNormal(2))


# -- Monte Carlo --------------------------------------------------------------------------------------

PAIRS = {  # a, b, exact TV
    "1-D shift": (normal(0.0, 1.0), normal(1.0, 1.0), normal_tv(0, 1, 1, 1)),
    "1-D shift and scale": (normal(0.0, 1.0), normal(0.5, 2.0), normal_tv(0, 1, 0.5, 2)),
    "5-D shift along e1": (normal(0.0, 1.0, 5), normal(1.5, 1.0, 5), normal_tv(0, 1, 1.5, 1)),
    "3-D scale": (normal(0.0, 1.0, 3), normal(0.0, math.sqrt(2), 3), isotropic_normal_tv(3, 2.0)),
}
REPEATS, SAMPLES = 100, 400


def batched_samples(density):
    """``REPEATS`` independent sets of ``SAMPLES`` draws, shape ``(REPEATS, SAMPLES, d)``."""
    x = density.sample((SAMPLES, REPEATS)).movedim(0, 1)
    return x if x.dim() == 3 else x.unsqueeze(-1)


def covered(estimate, truth):
    return int(((estimate.low <= truth) & (truth <= estimate.high)).sum())


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_95_percent_intervals_cover_the_exact_tv(pair):
    """100 seeded repetitions of 400 draws per side, evaluated as one batch: coverage ≥ 90 for each
    side alone and for the combined estimate, with the CLT and the empirical-Bernstein interval."""
    torch.manual_seed(sorted(PAIRS).index(pair))
    a, b, truth = PAIRS[pair]
    xa, xb = batched_samples(a), batched_samples(b)
    width = {}
    for interval in ("clt", "bernstein"):
        estimates = {
            "a": tv_sampled(a, b, points=xa, interval=interval),
            "b": tv_sampled(b, a, points=xb, interval=interval),
            "combined": tv_combined(a, b, points_a=xa, points_b=xb, interval=interval),
        }
        for side, est in estimates.items():
            assert est.estimate.shape == (REPEATS,) and est.samples == SAMPLES and est.level == 0.95
            assert covered(est, truth) >= 90, (interval, side, covered(est, truth))
            assert abs(float(est.estimate.mean()) - truth) < 4 * float(est.stderr.mean()) / math.sqrt(REPEATS)
        sides = max(float(estimates[side].stderr.mean()) for side in "ab")
        assert float(estimates["combined"].stderr.mean()) < 0.75 * sides  # (σ_a² + σ_b²)/4 ≤ max σ²/2
        width[interval] = estimates["combined"].high - estimates["combined"].low
    assert bool((width["bernstein"] > width["clt"]).all())


def test_bernstein_covers_where_the_clt_interval_fails():
    """TV = 0.9973 (N(0, 1) against N(6, 1)): nearly every term is 1, the sample variance collapses and
    the CLT interval undercovers; the finite-sample interval does not."""
    torch.manual_seed(0)
    a, b = normal(0.0, 1.0), normal(6.0, 1.0)
    truth = normal_tv(0, 1, 6, 1)
    xa, xb = batched_samples(a), batched_samples(b)
    clt = tv_combined(a, b, points_a=xa, points_b=xb, interval="clt")
    bernstein = tv_combined(a, b, points_a=xa, points_b=xb)
    assert covered(clt, truth) < 90 <= 95 <= covered(bernstein, truth)


def test_a_flow_against_a_flowprobe_target_covers_in_four_dimensions():
    """The flow side draws through the forward pass, the target side evaluates the flow through its
    inverse: a Householder reflection keeps N(0, I₄), the target is N(1.2 e₁, I₄)."""
    torch.manual_seed(1)
    flow = fp.Flow(fp.StandardNormal(4), [fp.Householder(4, reflections=2)]).double()
    loc = torch.tensor([1.2, 0.0, 0.0, 0.0], dtype=F64)
    target = fp.DiagonalNormal(loc, torch.ones(4, dtype=F64))
    truth = normal_tv(0, 1, 1.2, 1)
    runs = [tv_combined(flow, target, SAMPLES, interval="clt") for _ in range(REPEATS)]
    assert sum(float(r.low) <= truth <= float(r.high) for r in runs) >= 90
    auto = estimate_tv(flow, target, 20_000)
    assert auto.method == "combined" and auto.interval == "bernstein" and auto.samples == 20_000
    assert float(auto.low) <= truth <= float(auto.high) and float(auto.high - auto.low) < 0.03


def test_one_side_from_points_equals_the_log_density_formula():
    torch.manual_seed(2)
    flow = fp.Flow(fp.StandardNormal(2), [fp.Planar(2, "tanh"), fp.Radial(2)]).double()
    target = fp.DiagonalNormal(torch.zeros(2, dtype=F64), torch.full((2,), 1.3, dtype=F64))
    x = flow.sample(500)
    est = tv_sampled(flow, target, points=x)
    ref = tv_monte_carlo(flow.log_prob(x), target.log_prob(x))
    assert torch.equal(est.estimate, ref.estimate) and torch.equal(est.high, ref.high)
    with torch.no_grad():
        terms = (1 - (target.log_prob(x) - flow.log_prob(x)).exp()).clamp_min(0)
    assert float(est.estimate) == pytest.approx(float(terms.mean()), abs=1e-15)


def test_a_batch_gives_one_estimate_per_leading_index():
    torch.manual_seed(3)
    a, b = normal(0.0, 1.0, 2), normal(0.7, 1.0, 2)
    xa, xb = a.sample((3, 50)), b.sample((3, 50))
    batch = tv_combined(a, b, points_a=xa, points_b=xb, interval="clt")
    assert batch.estimate.shape == batch.low.shape == batch.stderr.shape == (3,)
    for i in range(3):
        one = tv_combined(a, b, points_a=xa[i], points_b=xb[i], interval="clt")
        assert torch.allclose(one.estimate, batch.estimate[i], rtol=0, atol=1e-15)
        assert torch.allclose(one.high, batch.high[i], rtol=0, atol=1e-15)
    assert len(batch.to_dict()["estimate"]) == 3


def test_an_ensemble_of_flows_gives_each_member_its_own_tv_against_any_density():
    """Members draw (E, N, d); a flowprobe density (points (N, d) only) sees them flattened."""
    torch.manual_seed(4)
    flow = fp.build_flow("planar:3:tanh", 2, F64, ensemble=3)
    target = fp.DiagonalNormal(torch.tensor([0.5, 0.0], dtype=F64), torch.ones(2, dtype=F64))
    xa, xb = flow.sample(300), target.sample(300)
    assert xa.shape == (3, 300, 2)
    batch = tv_combined(flow, target, points_a=xa, points_b=xb)
    drawn = tv_combined(flow, target, 300)
    assert batch.estimate.shape == drawn.estimate.shape == (3,)
    for i in range(3):
        alone = tv_combined(flow.member(i), target, points_a=xa[i], points_b=xb)
        assert torch.allclose(alone.estimate, batch.estimate[i], rtol=0, atol=1e-12)
        assert torch.allclose(alone.high, batch.high[i], rtol=0, atol=1e-12)


def test_monte_carlo_from_log_densities():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000)
    mc = tv_monte_carlo(stats.norm.logpdf(x), stats.norm.logpdf(x, 1.0), level=0.99, interval="clt")
    exact = normal_tv(0, 1, 1, 1)
    assert float(mc.low) <= exact <= float(mc.high)
    assert float(mc.high - mc.low) < 0.01 and mc.samples == 200_000 and mc.level == 0.99
    a = torch.tensor([0.0, -1.0, -2.0], dtype=F64)
    half = tv_monte_carlo(a, a - np.log(2))
    assert float(half.estimate) == pytest.approx(0.5) and float(half.stderr) == pytest.approx(0.0, abs=1e-15)
    assert half.to_dict() == {"estimate": 0.5, "low": half.low.item(), "high": half.high.item(), "stderr": 0.0,
                              "samples": 3, "level": 0.95, "method": "monte-carlo", "interval": "bernstein"}


@pytest.mark.parametrize(("a", "b", "level", "interval", "message"), [
    (np.zeros(3), np.zeros(4), 0.99, "clt", "one shape"),
    (np.zeros(1), np.zeros(1), 0.99, "clt", "two samples"),
    (np.array([0.0, np.nan]), np.zeros(2), 0.99, "clt", "NaN"),
    (np.zeros(3), np.zeros(3), 1.5, "clt", "level"),
    (np.zeros(3), np.zeros(3), 0.95, "hoeffding", "interval"),
])
def test_monte_carlo_rejects_bad_input(a, b, level, interval, message):
    with pytest.raises(ValueError, match=message):
        tv_monte_carlo(a, b, level, interval)


def test_estimators_reject_bad_arguments():
    a, b = normal(0.0, 1.0, 2), normal(1.0, 1.0, 2)
    with pytest.raises(ValueError, match="must have log_prob"):
        tv_sampled(object(), b, 10)
    with pytest.raises(ValueError, match="number of samples n or the points"):
        tv_sampled(a, b)
    with pytest.raises(ValueError, match="counts must agree"):
        tv_combined(a, b, points_a=a.sample((10,)), points_b=b.sample((12,)))
    with pytest.raises(ValueError, match="shape \\(..., N, d\\)"):
        tv_sampled(a, b, points=torch.zeros(5))
    with pytest.raises(ValueError, match="at least two samples"):
        tv_combined(a, b, 1)
    with pytest.raises(ValueError, match="method must be"):
        estimate_tv(a, b, method="exact")
