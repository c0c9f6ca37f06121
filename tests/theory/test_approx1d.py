import json

import numpy as np
import pytest
import torch
from scipy import stats

from flowprobe import Flow, Planar, StandardNormal
from flowprobe.cli import main
from flowprobe.theory.approx1d import PiecewiseLinearMap, construct, convergence_study, two_layer_example
from flowprobe.theory.targets1d import BUILTIN_TARGETS, parse_target
from flowprobe.theory.tv import tv_quadrature


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: extra intra-op threads only contend on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def blog():
    return {n: construct("blog-mixture", n) for n in (50, 300)}


def test_two_layer_example_has_the_blog_pieces():
    pwl = PiecewiseLinearMap.from_flow(two_layer_example())
    np.testing.assert_allclose(pwl.x_knots, [-1.0, 1.0], atol=1e-15)
    np.testing.assert_allclose(pwl.means, [0.0, -0.2, -1.25], atol=1e-15)
    np.testing.assert_allclose(pwl.stds, [1.0, 0.8, 1.5], atol=1e-15)


def test_blog_mixture_meets_the_reference_bounds(blog):
    assert blog[50].tv() <= 0.0082 and blog[300].tv() <= 0.0014
    assert blog[50].tv() < 0.0045 and blog[300].tv() < 0.0007  # the optimal knots halve the reference


def test_equispaced_height_rule_reproduces_the_reference_numbers():
    # docs/theory/approx1d.md §6: TV, range of the layer slopes 1 + wu, first right layer (c = 0, u)
    for n, expected, low, high in ((50, 0.0081585, 0.9083, 1.5382), (300, 0.0013096, 0.9845, 1.5495)):
        built = construct("blog-mixture", n, knots="equispaced", tail="height")
        assert built.tv() == pytest.approx(expected, abs=6e-8)
        slopes = np.array([1 + float(layer.constrained().wu.detach()) for layer in built.flow.layers])
        assert slopes.min() == pytest.approx(low, abs=1e-4) and slopes.max() == pytest.approx(high, abs=1e-4)
        first = [float(v.detach()) for v in built.flow.layers[0].constrained()]
        assert -first[2] / first[1] == pytest.approx(0.0, abs=1e-15)  # (u, w, b, wu)
        assert first[0] == pytest.approx(high - 1, abs=1e-4)


def test_optimal_rule_follows_its_predicted_constant(blog):
    for built in blog.values():
        pieces = built.layers - 2
        assert built.tv() == pytest.approx(built.knot_constant / pieces, rel=0.05)


@pytest.mark.parametrize("name", BUILTIN_TARGETS)
def test_tv_decreases_along_the_depth_grid(name):
    tv = [r["tv"] for r in convergence_study(name, grid=(4, 10, 25, 50), tail="height")["results"]]
    assert all(np.diff(tv) < 0), tv
    assert tv[-1] < 0.025


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTIN_TARGETS)
def test_tv_decreases_along_the_full_depth_grid_with_default_rules(name):
    study = convergence_study(name, grid=(4, 10, 25, 50, 100, 300, 1000))
    tv = [r["tv"] for r in study["results"]]
    assert all(np.diff(tv) < 0), tv
    assert -1.2 < study["slope"] < -0.9


@pytest.mark.parametrize(("name", "n"), [("blog-mixture", 300), ("exponential", 50), ("cauchy", 50), ("beta", 50)])
def test_piece_masses_equal_target_masses(name, n):
    built = construct(name, n, tail="height")
    edges = np.concatenate([[-np.inf], built.knots, [np.inf]])  # n − 2 pieces (one less if aligned) + 2 tails
    mass, target_mass = built.map.mass(edges[:-1], edges[1:]), built.target.mass(edges[:-1], edges[1:])
    assert mass.size == n - built.aligned
    np.testing.assert_allclose(mass, target_mass, rtol=0, atol=1e-12)
    table = built.piece_table()
    assert table["lo"].size == n and abs(table["mass"].sum() - 1) < 1e-12  # both sweeps start at the centre


def test_pushforward_integrates_to_one(blog):
    pwl = blog[300].map
    nothing = lambda x: np.full(np.shape(x), -np.inf)  # noqa: E731  TV(q, 0) = ½∫q
    assert abs(2 * tv_quadrature(pwl.log_prob, nothing, pwl.x_knots, tol=1e-12) - 1) < 1e-11


def test_collapsed_map_agrees_with_the_layers(blog):
    flow, pwl = blog[300].flow, blog[300].map
    torch.manual_seed(0)
    z = 2 * torch.randn(5000, 1, dtype=torch.float64)
    with torch.no_grad():
        x, logdet = flow(z)
        log_q = flow.log_prob(x)
    xs = x[:, 0].numpy()
    np.testing.assert_allclose(pwl.forward(z[:, 0].numpy()), xs, rtol=0, atol=1e-10)
    np.testing.assert_allclose(pwl.inverse(xs), z[:, 0].numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(pwl.log_prob(xs), log_q.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(pwl.log_prob(xs), flow.base.log_prob(z).numpy() - logdet.numpy(), atol=1e-10)
    np.testing.assert_allclose(pwl.cdf(xs), torch.special.ndtr(z[:, 0]).numpy(), rtol=0, atol=1e-12)


def test_layers_are_ordinary_relu_planar_layers(blog):
    flow = blog[50].flow
    assert len(flow.layers) == 50 and all(isinstance(la.stack, Planar) and la.act.name == "relu" for la in flow.layers)
    assert all(la.invertibility().invertible for la in flow.layers)


@pytest.mark.parametrize(("name", "n"), [("blog-mixture", 50), ("cauchy", 25), ("uniform", 10)])
def test_exact_tv_lies_in_the_monte_carlo_interval(name, n):
    built = construct(name, n, tail="height")
    mc = built.tv_monte_carlo(200_000, level=0.99, seed=1)
    assert float(mc.low) <= built.tv() <= float(mc.high)


def test_a_normal_target_is_reproduced_exactly():
    assert construct("scipy:norm(loc=1, scale=2)", 10, tail="height").tv() < 1e-12


def test_non_crossing_cdfs_use_one_alignment_layer():
    built = construct("exponential", 25, tail="height")
    assert built.aligned and built.layers == 25 and built.knots.size == 23
    assert built.centre == pytest.approx(np.log(2), abs=1e-14)


def test_bounded_support_and_heavy_tails_converge():
    for name, bound in (("uniform", 0.014), ("beta", 0.005), ("cauchy", 0.021), ("student-t3", 0.007)):
        assert construct(name, 50).tv() < bound, name


def test_source_parameters(blog):
    built = construct("blog-mixture", 50, source=(2.0, 0.5))  # CDFs cross only far in the tail: aligned
    assert built.tv() == pytest.approx(blog[50].tv(), rel=0.05) and built.aligned


def test_file_targets(tmp_path):
    path = tmp_path / "target.py"
    path.write_text(
        "import numpy as np\nfrom scipy import stats\n"
        "frozen = stats.gamma(3.0)\n"
        "def log_density(x):\n    return np.logaddexp(-0.5 * (x + 1) ** 2, -0.5 * (x - 2) ** 2 / 0.25)\n"
        "def broken(x):\n    return np.full(np.shape(x), np.nan)\n"
        "def empty(x):\n    return np.full(np.shape(x), -np.inf)\n"
    )
    assert construct(f"{path}:frozen", 25).tv() < 0.02
    target = parse_target(f"{path}:log_density")
    x = np.array([-1.0, 0.3, 2.0])
    mixture = stats.norm(-1, 1), stats.norm(2, 0.5)  # the normalised density: 2/3 N(−1, 1) + 1/3 N(2, 0.5²)
    np.testing.assert_allclose(target.log_pdf(x), np.log(2 / 3 * mixture[0].pdf(x) + mixture[1].pdf(x) / 3),
                               atol=1e-11)
    np.testing.assert_allclose(target.cdf(x), 2 / 3 * mixture[0].cdf(x) + mixture[1].cdf(x) / 3, atol=1e-11)
    assert construct(target, 25, tail="height").tv() < 0.03
    with pytest.raises(ValueError, match="NaN"):
        parse_target(f"{path}:broken")
    with pytest.raises(ValueError, match="zero mass"):
        parse_target(f"{path}:empty")
    with pytest.raises(ValueError, match="has no attribute"):
        parse_target(f"{path}:missing")


@pytest.mark.parametrize(("spec", "message"), [
    ("scipy:poisson(mu=3)", "no density"),
    ("scipy:norm(scale=-1)", "invalid parameters"),
    ("scipy:norm(loc=x)", "must be a number"),
    ("nope", "unknown target"),
])
def test_bad_targets_are_rejected(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_target(spec)


def test_zero_mass_in_a_piece_is_an_error(tmp_path):
    path = tmp_path / "gap.py"
    path.write_text("import numpy as np\n"
                    "def two_boxes(x):\n    return np.where((np.abs(x) > 1) & (np.abs(x) < 2), 0.0, -np.inf)\n")
    with pytest.raises(ValueError, match="zero mass on"):
        construct(f"{path}:two_boxes", 20, knots="equispaced", interval=(-1.99, 1.99), tail="height")


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="layers"):
        construct("laplace", 3)
    with pytest.raises(ValueError, match="knot rule"):
        construct("laplace", 10, knots="random")
    with pytest.raises(ValueError, match="contain the centre"):
        construct("laplace", 10, knots="equispaced", interval=(1.0, 2.0))
    with pytest.raises(ValueError, match="only piecewise-linear Planar"):
        PiecewiseLinearMap.from_flow(Flow(StandardNormal(1), [Planar(1, "tanh")]))


def test_cli_json(capsys):
    assert main(["approx1d", "laplace", "--layers", "10", "25", "--json", "--mc-samples", "20000", "--tail",
                 "height"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["target"] == "laplace" and [r["layers"] for r in report["results"]] == [10, 25]
    for r in report["results"]:
        assert r["tv_mc_ci"][0] <= r["tv"] <= r["tv_mc_ci"][1]
    assert report["slope"] < -0.9


@pytest.mark.parametrize("argv", [
    ["approx1d", "scipy:poisson(mu=3)"],
    ["approx1d", "missing_file.py:f"],
    ["approx1d", "laplace", "--knots", "equispaced", "--interval", "2", "1"],
])
def test_cli_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowprobe approx1d: error:") and err.count("\n") == 1
