"""Minimum depth: the floors and lower bounds against closed forms and random flows, brackets, pairs from
specs, ensemble training, and the Householder acceptance (d = 2, 4 here; 6, 8 in a slow test)."""

import math

import pytest
import torch
from scipy import special

import flowprobe as fp
from flowprobe.flow import Flow
from flowprobe.spec import build_layers
from flowprobe.sweep import Store, run_sweep
from flowprobe.theory import depth_experiments as dx
from flowprobe.theory.depth import (
    HOUSEHOLDER_GAP,
    DepthOutcome,
    GaussianForm,
    bracket,
    depth_theory,
    displacement_tv_floor,
    householder_construction,
    reflection_tv_floor,
    shift_construction,
)
from flowprobe.theory.depth_pairs import load_pair, load_side, pin_spec
from flowprobe.theory.tv import tv_combined

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dx.Training(steps=200, train_samples=4096, tv_samples=5000)


def test_householder_gap_is_tv_of_two_normals():
    x = math.sqrt(2 * math.log(2))  # the crossing of N(0, 2) and N(0, 1)
    closed = 2 * (special.ndtr(x) - special.ndtr(x / math.sqrt(2)))
    assert HOUSEHOLDER_GAP == pytest.approx(closed, abs=1e-15) and HOUSEHOLDER_GAP == pytest.approx(0.16606407498)


@pytest.mark.parametrize("dim", [2, 4, 6, 8])
def test_householder_floor_and_lower_bound_are_d_over_2(dim):
    q, p = householder_construction(dim)
    floors = [reflection_tv_floor(q.cov, p.cov, n) for n in range(dim + 2)]
    assert floors[: dim // 2] == [pytest.approx(HOUSEHOLDER_GAP, abs=1e-14)] * (dim // 2)
    assert floors[dim // 2 :] == [0.0] * (dim // 2 + 2)
    theory = depth_theory(fp.Householder(dim), q, p)
    assert theory.kind == "reflections"
    assert [theory.lower_bound(eps) for eps in (0.01, 0.1, 0.166, 0.1661, 0.5)] == [dim // 2] * 3 + [0, 0]
    two = depth_theory(fp.Householder(dim, reflections=2), q, p)  # two reflections per layer: half the layers
    assert two.lower_bound(0.1) == math.ceil(dim / 4)


def test_reflection_floor_is_rotation_invariant_and_general():
    torch.manual_seed(1)
    q, p = householder_construction(6)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    turned = [rotation @ c @ rotation.T for c in (q.cov, p.cov)]
    for n in range(7):
        assert reflection_tv_floor(*turned, n) == pytest.approx(reflection_tv_floor(q.cov, p.cov, n), abs=1e-12)
    # ratios 4, 1, 1/3: one reflection may fix the 4 but the 1/3 direction survives in any fixed plane
    a, b = torch.diag(torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64)), torch.diag(
        torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64))
    g = [fp.theory.tv.normal_tv(0, math.sqrt(r), 0, 1) for r in (4.0, 1 / 3)]
    assert reflection_tv_floor(a, b, 0) == pytest.approx(max(g))
    assert reflection_tv_floor(a, b, 1) == pytest.approx(0.0)  # r_2 = 1 and r_2 = 1: nothing left
    with pytest.raises(ValueError, match="non-negative integer"):
        reflection_tv_floor(a, b, -1)


def test_random_householder_flows_stay_above_the_floor():
    q, p = householder_construction(6)
    pair = load_pair("halves:2:1", "halves:1:2", 6)
    torch.manual_seed(3)
    flow = Flow(pair.source, build_layers("householder:2", 6, ensemble=3)).double()  # n = 2 < d/2
    tv = tv_combined(flow, pair.target, 4000)
    assert tv.estimate.shape == (3,)
    assert bool((tv.high >= reflection_tv_floor(q.cov, p.cov, 2)).all())


@pytest.mark.parametrize(("activation", "u_max", "bound"), [("tanh", 1.0, 1.0), ("sigmoid", 0.5, 1.0),
                                                           ("arctan", 0.5, math.pi / 2)])
def test_displacement_floor_and_lower_bound(activation, u_max, bound):
    delta = u_max * bound
    layer = fp.Planar(4, activation, u_max=u_max)
    assert layer.displacement == pytest.approx(delta)
    for distance in (0.5, 3.0, 16.0):
        q, p = shift_construction(4, distance)
        theory = depth_theory(layer, q, p)
        for n in range(0, 20):
            expected = 2 * special.ndtr((distance - n * delta) / 2) - 1 if distance > n * delta else 0.0
            assert theory.floor(n) == pytest.approx(expected, abs=1e-14)
        for eps in (0.05, 0.1, 0.5):
            real = (distance - 2 * special.ndtri((1 + eps) / 2)) / delta
            assert theory.real_bound(eps) == pytest.approx(max(real, 0.0))
            assert theory.lower_bound(eps) == max(math.ceil(real), 0)
    assert displacement_tv_floor(16.0, 2.0, 4.0) == pytest.approx(2 * special.ndtr(3.0) - 1)


def test_bounded_planar_flows_move_points_by_at_most_t_delta_and_respect_the_floor():
    torch.manual_seed(0)
    q, p = shift_construction(3, 5.0)
    pair = load_pair("normal", "shift:5.0", 3)
    flow = Flow(pair.source, build_layers("planar:3:arctan:umax=0.7", 3, ensemble=4)).double()
    with torch.no_grad():
        for param in flow.parameters():
            param.mul_(20).add_(torch.randn_like(param))  # far from the initialisation: saturated, ‖u‖ near U
    z = pair.source.sample(5000)
    x, _ = flow(z)
    reach = 3 * 0.7 * math.pi / 2
    moved = (x - z).norm(dim=-1).max()
    assert 0.5 * reach < moved <= reach
    theory = depth_theory(flow.stacks[0], q, p)
    assert bool((tv_combined(flow, pair.target, 4000).high >= theory.floor(3)).all())


def test_theory_applies_only_where_proven():
    q, p = householder_construction(4)
    shifted = GaussianForm(q.mean + 1, p.cov)
    assert depth_theory(fp.Householder(4), q, shifted) is None  # different means
    assert depth_theory(fp.Planar(4, "tanh"), *shift_construction(4, 2.0)) is None  # unbounded u
    assert depth_theory(fp.Planar(4, "softplus", u_max=1.0), *shift_construction(4, 2.0)) is None  # unbounded h
    assert depth_theory(fp.Planar(4, "tanh", u_max=1.0), q, p) is None  # different covariances
    assert depth_theory(fp.Planar(4, "tanh", u_max=1.0), q, q).lower_bound(0.1) == 0  # one density: floor 0
    assert depth_theory(fp.Planar(4, "tanh", u_max=1.0), q, GaussianForm(q.mean + 1, q.cov * 2)) is None
    assert depth_theory(fp.Radial(4), q, p) is None
    assert depth_theory(fp.Householder(4), q, None) is None


def test_brackets_report_what_they_show_and_nothing_more():
    out = [DepthOutcome(1, "above", 0.3), DepthOutcome(2, "reached", 0.05), DepthOutcome(3, "reached", 0.04)]
    closed = bracket(out, 2)
    assert (closed.lower, closed.upper, closed.closed, closed.text()) == (2, 2, True, "[2, 2]")
    assert "T_ε = 2" in closed.statement(0.1) and "not lower bounds" in closed.statement(0.1)
    gap = bracket([DepthOutcome(3, "failed", note="x"), DepthOutcome(5, "reached", 0.01),
                   DepthOutcome(6, "inconclusive", 0.11)], None)
    assert (gap.lower, gap.upper, gap.closed, gap.unreached_above, gap.text()) == (None, 5, False, (6,), "[?, 5]")
    assert "no lower bound is proven" in gap.statement(0.1) and "optimisation failure" in gap.statement(0.1)
    bad = bracket([DepthOutcome(1, "reached", 0.05)], 2)
    assert bad.contradiction and "CONTRADICTION" in bad.statement(0.1)
    assert bracket([DepthOutcome(0, "above", 0.5), DepthOutcome(4, "above", 0.2)], 3).text() == "[3, >4]"
    with pytest.raises(ValueError, match="each depth may appear once"):
        bracket([DepthOutcome(1, "above"), DepthOutcome(1, "reached")], None)
    with pytest.raises(ValueError, match="status must be one of"):
        DepthOutcome(1, "maybe")


# -- pairs from specs ----------------------------------------------------------------------------


def test_builtin_specs_are_the_named_normals():
    side, form = load_side("normal:mean=[1,2,3]:cov=[1,2,3]", 3)
    assert torch.equal(form.mean, torch.tensor([1.0, 2, 3], dtype=torch.float64))
    assert torch.equal(form.cov, torch.diag(torch.tensor([1.0, 2, 3], dtype=torch.float64)))
    x = side.sample(7)
    assert x.shape == (7, 3) and x.dtype == torch.float64
    expected = torch.distributions.MultivariateNormal(form.mean, form.cov).log_prob(x)
    assert torch.allclose(side.log_prob(x), expected)
    _, full = load_side("normal:cov=[[2,0.5],[0.5,1]]:mean=0.5", 2, torch.float32)
    assert full.cov.dtype == torch.float32 and full.mean.tolist() == [0.5, 0.5]
    assert load_side("shift:2.5", 2)[1].mean.tolist() == [2.5, 0.0]
    assert torch.diagonal(load_side("halves:2:1", 4)[1].cov).tolist() == [2.0, 2.0, 1.0, 1.0]
    assert torch.equal(load_side("normal:cov=3", 2)[1].cov, 3 * torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize(("spec", "dim", "message"), [
    ("gamma", 2, "unknown density 'gamma'"),
    ("normal:cov=[[1,2],[2,1]]", 2, "symmetric positive definite 2 × 2"),
    ("normal:cov=[1,-1]", 2, "2 positive variances"),
    ("normal:mean=[1,2,3]", 2, "mean must be a number or a list of 2"),
    ("normal:mean=NaN", 2, "must be finite"),
    ("normal:mean=nan", 2, "must be a number or a JSON list"),
    ("normal:scale=2", 2, "expected options mean=… and cov=…"),
    ("shift:inf", 2, "must be finite"),
    ("shift:abc", 2, "must be a number"),
    ("halves:2:1", 3, "even dimension"),
    ("normal", None, "needs the dimension"),
    ("normal", 10**6, "dimension must be an integer in"),
])
def test_bad_specs_are_one_line_errors(spec, dim, message):
    with pytest.raises(ValueError, match=message):
        load_side(spec, dim)


USER_FILE = """
import torch
from torch.distributions import MultivariateNormal, Normal

mvn = MultivariateNormal(torch.ones(3, dtype=torch.float64), 2 * torch.eye(3, dtype=torch.float64))
scalar = Normal(torch.tensor(0.0), torch.tensor(2.0))

def made():
    return MultivariateNormal(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))

def needs(x):
    return x

class Laplace:
    dim = 3
    def log_prob(self, x):
        return -x.abs().sum(-1) - 3 * torch.log(torch.tensor(2.0, dtype=x.dtype))
    def sample(self, n):
        return torch.distributions.Laplace(0.0, 1.0).sample((n, 3)).double()

laplace = Laplace()

class Wrong:
    def log_prob(self, x):
        return x
    def sample(self, n):
        return torch.zeros(n, 3)

wrong = Wrong()
batched = MultivariateNormal(torch.zeros(2, 3), torch.eye(3))
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(USER_FILE)
    return path


def test_file_specs_give_densities_and_their_normal_forms(user_file):
    side, form = load_side(f"{user_file}:mvn", None)
    assert side.dim == 3 and torch.equal(form.cov, 2 * torch.eye(3, dtype=torch.float64))
    assert load_side(f"{user_file}:made", 3)[1] is not None
    scalar, form = load_side(f"{user_file}:scalar", None)
    assert scalar.dim == 1 and form.cov.item() == 4.0 and scalar.sample(5).shape == (5, 1)
    laplace, form = load_side(f"{user_file}:laplace", 3)
    assert form is None and laplace.log_prob(torch.zeros(2, 3, dtype=torch.float64)).shape == (2,)
    pair = load_pair(f"{user_file}:made", f"{user_file}:mvn", None)
    assert dx.theory_of("householder", pair) is None  # different means
    assert dx.theory_of("planar:tanh:umax=1", pair) is None  # different covariances


@pytest.mark.parametrize(("name", "message"), [
    ("needs", "function with required arguments"),
    ("wrong", "log_prob of 4 points must have shape"),
    ("batched", "no batch dimensions"),
    ("nothing", "has no attribute 'nothing'"),
])
def test_bad_file_objects_are_one_line_errors(user_file, name, message):
    with pytest.raises(ValueError, match=message):
        load_side(f"{user_file}:{name}", 3)


def test_pinned_files_refuse_changed_code(user_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pinned = pin_spec("mine.py:mvn")
    assert pinned.startswith(f"{user_file.resolve()}:mvn@sha256=") and pin_spec("shift:2") == "shift:2"
    assert load_side(pinned, 3)[0].dim == 3
    user_file.write_text(USER_FILE + "\n# edited\n")
    with pytest.raises(ValueError, match="changed since the sweep was defined"):
        load_side(pinned, 3)
    with pytest.raises(FileNotFoundError):
        pin_spec("absent.py:x")


def test_dimension_and_dtype_mismatches_are_refused(user_file):
    with pytest.raises(ValueError, match="dimension 3, expected 2"):
        load_pair("normal", f"{user_file}:mvn", 2)
    with pytest.raises(ValueError, match="share dtype and device"):
        load_pair("normal", f"{user_file}:mvn", 3, torch.float32)


# -- training and measuring ----------------------------------------------------------------------


def test_ensemble_members_equal_flows_trained_alone():
    pair = load_pair("halves:2:1", "halves:1:2", 4)
    data = pair.target.sample(1024)
    settings = dx.Training(steps=30, batch_size=64)
    flow, histories = dx.train_members("householder", pair, 2, [5, 9], data, settings)
    assert len(histories) == 2 and all(h.failed is None for h in histories)
    torch.manual_seed(9)
    alone = Flow(pair.source, build_layers("householder:2", 4)).double()
    fp.fit(alone, data=data, seed=9, steps=30, lr=settings.lr, batch_size=64, log_every=30)
    assert torch.allclose(flow.member(1).stacks[0].v, alone.stacks[0].v, atol=1e-10)


def test_family_specs_and_checks():
    assert dx.family_spec("planar:tanh:umax=1", 3) == "planar:3:tanh:umax=1"
    assert dx.family_spec("householder", 2) == "householder:2"
    for bad, message in (("planar:3:tanh", "without a layer count"), ("planar+radial", "one spec term"),
                         ("cubic", "unknown"), ("planar:swish", "planar")):
        with pytest.raises(ValueError, match=message):
            dx.check_family(bad)


def test_a_diverged_seed_is_reported_failed_and_not_measured(monkeypatch):
    real_fit = dx.fit

    def fit_with_a_failure(*args, **kwargs):
        histories = real_fit(*args, **kwargs)
        histories[1].failed = "training diverged at step 7 (loss nan); try a smaller lr"
        with torch.no_grad():
            for param in args[0].parameters():
                param[1] = math.nan  # what a diverged member may leave behind
        return histories

    monkeypatch.setattr(dx, "fit", fit_with_a_failure)
    pair = load_pair("halves:2:1", "halves:1:2", 2)
    result = dx.measure_depth("householder", pair, 1, [0, 1], 0.1, dx.Training(steps=50, tv_samples=2000), seed=1)
    ok, failed = result["members"]
    assert failed["failed"].startswith("training diverged") and failed["tv"] is failed["high"] is None
    assert failed["final_loss"] is None and ok["failed"] is None and ok["high"] <= 0.1
    assert result["status"] == "reached" and result["best_high"] == ok["high"]


def test_depth_zero_is_the_source():
    pair = load_pair("halves:2:1", "halves:1:2", 2)
    source = dx.measure_depth("householder", pair, 0, [0, 1], 0.1, FAST, seed=3)
    assert source["members"][0]["seed"] is None and source["status"] == "above"
    truth = 2 / math.pi * (math.atan(math.sqrt(2)) - math.atan(math.sqrt(0.5)))  # a > b on |x₂| < |x₁|
    assert source["members"][0]["low"] <= truth <= source["members"][0]["high"]
    assert source["floor"] == pytest.approx(HOUSEHOLDER_GAP) and source["lower_bound"] == 1
    again = dx.measure_depth("householder", pair, 0, [0, 1], 0.1, FAST, seed=3)
    assert again == source  # the seed fixes every draw
    for bad, message in ((dict(eps=1.5), "ε must lie in"), (dict(depth=-1), "depth must be"),
                         (dict(seeds=[1, 1]), "seeds must differ"), (dict(seeds=[]), "between 1 and")):
        kwargs = dict(family="householder", pair=pair, depth=1, seeds=[0], eps=0.1) | bad
        with pytest.raises(ValueError, match=message):
            dx.measure_depth(**kwargs)


@pytest.fixture(scope="module")
def householder_store(tmp_path_factory):
    """The Householder table for d = 2, 4 (ε = 0.1, 4 seeds, 200 steps), swept in this process."""
    path = tmp_path_factory.mktemp("depth") / "householder.sqlite"
    torch.set_num_threads(1)
    summary = run_sweep(dx.householder_sweep((2, 4), 0.1, (0, 1, 2, 3), FAST), path, workers=0, progress=False)
    assert (summary.total, summary.ran, summary.failed) == (6, 6, 0)
    return path


def _acceptance(path, dims):
    with Store(path, readonly=True) as store:
        found = {c.params["d"]: c for c in dx.brackets(store.rows())}
    assert sorted(found) == sorted(dims)
    for d in dims:
        c = found[d]
        assert (c.bracket.lower, c.bracket.upper, c.bracket.closed) == (d // 2, d // 2, True)
        runs = {r["params"]["depth"]: r["result"] for r in c.rows}
        below, at = runs[d // 2 - 1], runs[d // 2]
        assert below["status"] == "above" and all(m["low"] > 0.1 for m in below["members"])
        assert below["floor"] == pytest.approx(HOUSEHOLDER_GAP) and at["floor"] == 0
        assert at["status"] == "reached" and min(m["high"] for m in at["members"]) <= 0.1
    return found


def test_householder_brackets_close_at_d_over_2(householder_store):
    found = _acceptance(householder_store, (2, 4))
    assert len(found[4].rows[1]["result"]["members"]) == 4
    assert found[4].rows[1]["result"]["interval_level"] == pytest.approx(1 - 0.05 / 4)


@pytest.mark.slow
def test_householder_brackets_close_at_d_over_2_in_6_and_8_dimensions(tmp_path):
    path = tmp_path / "householder.sqlite"
    summary = run_sweep(dx.householder_sweep((6, 8), 0.1, (0, 1, 2, 3), dx.Training()), path, workers=2,
                        progress=False)
    assert summary.failed == 0
    _acceptance(path, (6, 8))


@pytest.mark.slow
def test_bounded_planar_upper_bounds_respect_the_lower_bound_and_grow_with_r(tmp_path):
    path = tmp_path / "planar.sqlite"
    run_sweep(dx.planar_sweep((2, 4, 8, 16), (0.5, 1.0), seeds=(0, 1, 2)), path, workers=2, progress=False)
    with Store(path, readonly=True) as store:
        found = dx.brackets(store.rows())
    assert len(found) == 8
    by_r = sorted(found, key=lambda c: float(c.params["target"].split(":")[1]))
    uppers = [c.bracket.upper for c in by_r]
    assert None not in uppers and uppers == sorted(uppers)
    assert all(c.bracket.upper >= c.bracket.lower and not c.bracket.contradiction for c in found)
    kappa_one = [c.bracket.upper for c in found if c.params["series"] == "κ=1"]
    assert kappa_one == sorted(set(kappa_one))  # strictly increasing: R = 2, 4, 8, 16
