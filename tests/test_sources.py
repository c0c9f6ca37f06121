"""Trainable Gaussian sources (issue 16): positive definite for any raw value, exact log-density and
sampling, moment initialisation, specs, ensembles, run directories and the command line."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flowprobe as fp
from flowprobe.cli import main
from flowprobe.data import load_data
from flowprobe.distributions import log_scale_bound
from flowprobe.metrics import gaussian_nll, nll_per_dim
from flowprobe.rundir import check_probe, probe_outputs
from flowprobe.sources import build_source, gaussian_moments, initialise
from flowprobe.spec import default_spec, parse_source
from flowprobe.train import split_data

F64 = torch.float64


def full_normal(dim, dtype, loc, log_scale, lower, ensemble=()):
    """A FullNormal whose raw parameters are the given values (any values at all)."""
    source = build_source("gaussian:full", dim, ensemble).to(dtype)
    with torch.no_grad():
        for name, value in (("loc", loc), ("log_scale", log_scale), ("lower", lower)):
            getattr(source, name).copy_(torch.as_tensor(value, dtype=dtype))  # every member alike
    return source


def raw_values(dim, width, bound=None):
    finite = st.floats(allow_nan=False, allow_infinity=False, width=width, min_value=bound and -bound,
                       max_value=bound)
    return st.tuples(st.lists(finite, min_size=dim, max_size=dim), st.lists(finite, min_size=dim, max_size=dim),
                     st.lists(finite, min_size=dim * (dim - 1) // 2, max_size=dim * (dim - 1) // 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(data=st.data(), dim=st.integers(1, 5))
def test_the_full_covariance_source_is_positive_definite_for_any_raw_value(dtype, data, dim):
    """Any finite raw values, the extremes of the type included: L has a positive, finite diagonal (so
    Σ = LLᵀ is positive definite), its log-determinant is finite, and where Σ is representable and not
    hopelessly ill-conditioned (|raw| ≤ 5) its Cholesky factorisation in float64 succeeds and returns L."""
    width = 32 if dtype == torch.float32 else 64
    source = full_normal(dim, dtype, *data.draw(raw_values(dim, width))).requires_grad_(False)
    diag = torch.diagonal(source.scale_tril())
    assert bool((diag > 0).all()) and bool(torch.isfinite(diag).all())
    assert math.isfinite(float(source.clamped_log_scale().sum()))
    moderate = full_normal(dim, dtype, *data.draw(raw_values(dim, width, bound=5.0))).requires_grad_(False)
    tril = moderate.scale_tril().to(F64)
    chol, info = torch.linalg.cholesky_ex(tril @ tril.T)
    assert int(info) == 0
    # float64 rounding of LLᵀ and of the factorisation: relative to L's largest entry (up to e⁵ here)
    torch.testing.assert_close(chol, tril, rtol=1e-6, atol=1e-9 * float(tril.abs().max().clamp_min(1)))


@given(data=st.data(), dim=st.integers(1, 5), members=st.sampled_from([(), (3,)]))
def test_log_density_equals_torch_multivariate_normal(data, dim, members):
    source = full_normal(dim, F64, *data.draw(raw_values(dim, 64, bound=3.0)), ensemble=members)
    if members:  # members differ
        with torch.no_grad():
            source.loc.add_(torch.arange(3, dtype=F64).unsqueeze(-1))
    x = 3 * torch.randn(*members, 7, dim, dtype=F64)
    reference = torch.distributions.MultivariateNormal(source.loc.unsqueeze(-2), scale_tril=source.scale_tril()
                                                       .unsqueeze(-3)).log_prob(x)
    with torch.no_grad():
        got = source.log_prob(x)
    assert got.shape == (*members, 7)
    assert float(((got - reference).abs() / reference.abs().clamp_min(1)).max().detach()) <= 1e-10


def test_samples_have_the_sources_moments_and_members_are_independent():
    tril = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.5, 0.0], [-1.0, 0.3, 2.0]], dtype=F64)
    source = fp.FullNormal(torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], dtype=F64), torch.stack([tril, tril]))
    x = source.sample(200_000)
    assert x.shape == (2, 200_000, 3)
    torch.testing.assert_close(x.mean(1), source.loc, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(x[0].T), tril @ tril.T, atol=0.05, rtol=0)
    assert abs(float(torch.corrcoef(torch.stack([x[0, :, 0], x[1, :, 0]]))[0, 1])) < 0.01
    solo = source.member(0)
    assert solo.ensemble_shape == () and torch.equal(solo.scale_tril(), tril)


def test_bad_constructor_arguments_are_refused():
    with pytest.raises(ValueError, match="lower triangular with a positive diagonal"):
        fp.FullNormal(torch.zeros(2), torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="lower triangular with a positive diagonal"):
        fp.FullNormal(torch.zeros(2), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"shapes \(\*E, dim\) and \(\*E, dim, dim\)"):
        fp.FullNormal(torch.zeros(2), torch.eye(3))
    with pytest.raises(ValueError, match="unknown source 'gaussian:ful'"):
        build_source("gaussian:ful", 2)
    with pytest.raises(ValueError, match="more than 1e\\+09"):
        build_source("gaussian:full", 50_000)


def test_the_log_scale_clamp_keeps_extreme_scales_finite():
    bound = log_scale_bound(torch.float32)
    assert math.isfinite(math.exp(2 * bound)) and math.exp(-2 * bound) > torch.finfo(torch.float32).tiny
    source = fp.DiagonalNormal(torch.zeros(2), torch.ones(2), trainable=True)
    with torch.no_grad():
        source.log_scale.copy_(torch.tensor([-1e30, 1e30]))
    assert bool(torch.isfinite(source.log_prob(torch.zeros(1, 2))).all())


# -- moments -----------------------------------------------------------------------------------------


def test_moments_are_the_maximum_likelihood_gaussian_when_nothing_is_degenerate():
    x = torch.randn(500, 3, dtype=F64) @ torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.5, 0.1]], dtype=F64)
    mean, cov, note = gaussian_moments(x)
    assert note is None
    torch.testing.assert_close(mean, x.mean(0), atol=1e-12, rtol=0)
    torch.testing.assert_close(cov, torch.cov(x.T, correction=0), atol=1e-12, rtol=0)
    _, diag, _ = gaussian_moments(x, full=False)
    torch.testing.assert_close(diag, torch.diag(x.var(0, correction=0)), atol=1e-12, rtol=0)


@pytest.mark.parametrize(("rows", "expected"), [
    (torch.tensor([[1.0, 5.0, 2.0], [2.0, 5.0, 4.1], [3.0, 5.0, 5.9], [4.0, 5.0, 8.0]]), "1 constant column(s)"),
    (torch.tensor([[1.0, 2.0, 3.0]]), "3 constant column(s)"),
    (torch.tensor([[1.0, 2.0, 3.0], [2.0, 0.0, 1.0]]), "fewer rows than dimensions"),
    (torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0], [0.0, 0.0]]), "collinear columns"),
])
def test_degenerate_moments_stay_positive_definite_and_say_what_was_done(rows, expected):
    mean, cov, note = gaussian_moments(rows)
    assert expected in note
    assert bool((torch.linalg.eigvalsh(cov) > 0).all())
    flow = fp.build_flow("gaussian:full>householder:1", rows.shape[1])  # the pulled-back points are as degenerate
    with pytest.warns(UserWarning, match="pulled back through the layers, regularised: "):
        initialise(flow, rows.float())
    assert bool(torch.isfinite(flow.log_prob(rows.float() + 0.1)).all())


def test_initialise_is_the_maximum_likelihood_source_given_the_layers():
    """Householder layers are orthogonal (log-det 0): after initialisation the flow's log-likelihood of the
    training points is exactly the maximum-likelihood Gaussian's."""
    x = load_data("wine").to(F64)
    train, _ = split_data(x, 0.1, 0)
    flow = fp.build_flow("gaussian:full>householder:2:k=3", 13, F64)
    assert initialise(flow, train) is None
    assert nll_per_dim(flow, train) == pytest.approx(gaussian_nll(train, train), abs=1e-10)
    with pytest.raises(ValueError, match="StandardNormal has no moments to initialise"):
        initialise(fp.build_flow("radial:1", 13, F64), train)
    with pytest.raises(ValueError, match="contains NaN"):
        initialise(flow, torch.full((3, 13), math.nan, dtype=F64))
    shared = fp.Flow(fp.FullNormal(torch.zeros(13, dtype=F64), torch.eye(13, dtype=F64)),
                     [fp.Radial(13, ensemble=2).double()])
    with pytest.raises(ValueError, match=r"batch shape \(2,\); the source has no ensemble shape"):
        initialise(shared, train)


# -- specs, fit, run directories ---------------------------------------------------------------------


def test_specs_name_a_source_and_stay_backward_compatible():
    assert parse_source("planar:2") == "normal" and parse_source("gaussian:full>planar:2") == "gaussian:full"
    assert isinstance(fp.build_flow("planar:2", 3).base, fp.StandardNormal)
    assert isinstance(fp.build_flow("gaussian:diag>planar:2", 3).base, fp.DiagonalNormal)
    flow = fp.build_flow("gaussian:full > radial:2", 3, ensemble=4)
    assert isinstance(flow.base, fp.FullNormal) and flow.base.ensemble_shape == (4,) == flow.ensemble_shape
    for spec, message in (("gauss>planar:2", "unknown source 'gauss'"), ("gaussian:full>", "no layers after"),
                          ("normal>normal>planar:2", "unknown source 'normal>normal'")):
        with pytest.raises(ValueError, match=message):
            fp.build_flow(spec, 2)
    assert default_spec(64) == "gaussian:full>sylvester:4:orthogonal:m=8+radial:8"
    assert default_spec(2) == "gaussian:full>sylvester:4:orthogonal:m=2+radial:8"
    assert default_spec(5000).startswith("gaussian:diag>")


@pytest.mark.parametrize("spec", ["householder:1", "planar:3", "radial:3", "sylvester:2:orthogonal:m=2",
                                  "sylvester:2:triangular+householder:1+radial:2"])
def test_fit_with_init_source_starts_from_the_gaussian_and_never_ends_worse_on_validation(spec):
    """Layers start at the identity (Householder: a rotation), so the step-0 flow is the data's Gaussian."""
    x = load_data("iris")
    torch.manual_seed(0)
    flow = fp.build_flow(f"gaussian:full>{spec}", 4, F64)
    history = fp.fit(flow, data=x, steps=20, lr=1.0, log_every=10, init_source=True)  # lr 1: training only hurts
    train, val = split_data(x, 0.1, 0)
    assert history.best_step == 0
    assert history.best_val_nll == pytest.approx(gaussian_nll(train, val), abs=1e-10)
    assert nll_per_dim(flow, val) == pytest.approx(gaussian_nll(train, val), abs=1e-10)
    with pytest.raises(ValueError, match="needs data="):
        fp.fit(flow, energy=fp.distributions.rezende_energy("U1"), steps=2, init_source=True)


def test_an_ensemble_source_trains_each_member_as_alone():
    x = load_data("iris").to(F64)
    torch.manual_seed(0)
    ensemble = fp.build_flow("gaussian:full>radial:2", 4, F64, ensemble=2)
    solos = [ensemble.member(m) for m in range(2)]
    settings = dict(steps=20, lr=0.05, batch_size=32, log_every=5, init_source=True)
    histories = fp.fit(ensemble, data=x, seeds=[3, 4], **settings)
    for m, solo in enumerate(solos):
        alone = fp.fit(solo, data=x, seed=3 + m, **settings)
        assert alone.best_step == histories[m].best_step
        for p, q in zip(ensemble.member(m).parameters(), solo.parameters(), strict=True):
            torch.testing.assert_close(p, q, atol=1e-10, rtol=0)
    shared = fp.Flow(fp.DiagonalNormal(torch.zeros(2), torch.ones(2), trainable=True), [fp.Radial(2, ensemble=2)])
    with pytest.raises(ValueError, match="the source \\(base\\) is shared by every member"):
        fp.fit(shared, data=x[:, :2].float(), steps=2)


def test_reverse_kl_trains_the_source_through_its_reparametrisation():
    """Target N(m, S) and a flow whose only non-trivial part is its source: reverse KL finds m and S."""
    m, tril = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([[0.5, 0.0], [0.4, 0.3]], dtype=F64)
    target = fp.FullNormal(m, tril)
    energy = fp.distributions.FunctionEnergy(lambda z: -target.log_prob(z), 2, "gaussian")
    torch.manual_seed(0)
    flow = fp.build_flow("gaussian:full>householder:1", 2, F64)
    fp.fit(flow, energy=energy, steps=150, lr=0.05, batch_size=128, anneal=0, log_every=50)
    samples = flow.sample(100_000)
    torch.testing.assert_close(samples.mean(0), m, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), tril @ tril.T, atol=0.02, rtol=0)


def test_the_probe_fingerprints_the_source_and_reads_older_runs():
    flow = fp.build_flow("gaussian:full>radial:1", 2, F64)
    recorded = probe_outputs(flow)
    assert recorded.shape == (8, 4)
    check_probe(flow, recorded[:, :3], "older weights")  # written before the source's column existed
    with torch.no_grad():
        flow.base.lower.add_(0.1)  # the layers compute the same function, the source does not
    with pytest.raises(ValueError, match="source changed"):
        check_probe(flow, recorded, "weights")


def test_command_line_default_flow_init_source_resume_and_reading_back(tmp_path, capsys):
    out = tmp_path / "run"
    fast = ["--steps", "30", "--log-every", "10", "--batch-size", "64", "--no-plots"]
    assert main(["fit", "--data", "iris", "--out", str(out), *fast]) == 0
    captured = capsys.readouterr()
    assert f"using {default_spec(4)}" in captured.err
    assert "Gaussian" in captured.out and "flow − Gaussian" in captured.out
    config = json.loads((out / "config.json").read_text())
    assert config["flow"] == default_spec(4) and config["fit"]["init_source"] is True
    flow, _ = fp.load_run(out)
    assert isinstance(flow.base, fp.FullNormal)
    assert main(["eval", str(out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["nll_flow"] == pytest.approx(nll_per_dim(flow, split_data(load_data("iris"), 0.1, 0)[1]))
    assert main(["sample", str(out), "-n", "5", "--output", str(tmp_path / "s.npy")]) == 0
    assert np.load(tmp_path / "s.npy").shape == (5, 4)
    capsys.readouterr()
    assert main(["plot", str(out), "--out", str(tmp_path / "figures"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["figures"]) >= 1
    for args, message in (
        (["fit", "--resume", str(out), "--no-init-source"], "--init-source False conflicts with the run's True"),
        (["fit", "--resume", str(out), "--flow", "gaussian:diag>radial:8"], "conflicts with the run's"),
        (["fit", "--energy", "U1", "--out", str(tmp_path / "e"), "--flow", "gaussian:full>radial:1",
          "--init-source"], "needs data="),
        (["fit", "--energy", "U1", "--out", str(tmp_path / "e")], "fit --energy needs --flow"),
    ):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert "note:" not in captured.err  # nothing to regularise on iris
    a, b = torch.randn(200, 1, dtype=F64), torch.randn(200, 1, dtype=F64)
    near = torch.cat([a, a + 1e-5 * torch.randn(200, 1, dtype=F64), b], 1)  # full rank, nearly collinear
    np.savetxt(tmp_path / "near.csv", near.numpy(), delimiter=",")
    assert main(["fit", "--data", str(tmp_path / "near.csv"), "--out", str(tmp_path / "r2"),
                 "--flow", "gaussian:full>householder:1", *fast]) == 0
    assert "layers, regularised: collinear columns: 1e-" in capsys.readouterr().err
