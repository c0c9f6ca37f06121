"""The compiled planar and radial run kernels, Sylvester back-substitutions and per-point Householder
reflections (layers/runs.cpp) equal the PyTorch kernels: values, log-dets and every gradient, float32 and
float64, every activation with a compiled implementation."""

import collections

import pytest
import torch
from tests.helpers import assert_same, outputs_and_grads, perturb

import flowprobe as fp
from flowprobe.activations import ACTIVATIONS
from flowprobe.layers import native
from flowprobe.layers.householder import reflect_all

MODULE = native.kernels(build=True)
pytestmark = pytest.mark.skipif(MODULE is None, reason="no C++ compiler: the compiled kernels are optional")
NATIVE = sorted(name for name, act in ACTIVATIONS.items() if act.native is not None)


@pytest.fixture(params=[16, 32], ids=["16-byte vectors", "AVX2"])
def vector_bytes(request):
    """Both vector widths of the planar and Sylvester kernels (AVX2 where the CPU has it)."""
    default = MODULE.vector_bytes(0)
    if MODULE.vector_bytes(request.param) != request.param:
        pytest.skip("this CPU has no AVX2")
    yield request.param
    MODULE.vector_bytes(default)


def check(stack, points, inverse=False, tol64=1e-12):
    """Compiled = PyTorch kernels to ``tol64`` in float64; in float32 the compiled kernels' errors against
    the float64 result are those of the PyTorch kernels (at most 4× theirs, plus rounding).

    Errors are relative to each tensor's largest entry (at least 1): a parameter gradient is a sum over
    points whose terms can be hundreds of times its value, and the order of a float32 sum (64-lane blocks
    here, PyTorch's own there) moves it by a few ulp of the terms, not of the value."""
    compiled, reference = both(stack, points, inverse)
    if points.dtype == torch.float64:
        assert_same(compiled, reference, tol64)
        return
    exact, _ = both(stack.double(), points.double(), inverse)
    stack.float()
    tensors = [(r[0], r[1], *r[2]) for r in (compiled, reference, exact)]
    flat = [torch.cat([t.flatten() for t in ts]).double() for ts in tensors]
    scale = torch.cat([t.abs().max().clamp_min(1).double().expand(t.numel()) for t in tensors[2]])
    error_compiled, error_torch = ((flat[0] - flat[2]) / scale).abs().max(), ((flat[1] - flat[2]) / scale).abs().max()
    assert error_compiled <= 4 * error_torch + 1e-6, (float(error_compiled), float(error_torch))


def both(stack, points, inverse=False):
    """(compiled, PyTorch) outputs and gradients of a training-style call on ``points`` (of the inverse
    with ``inverse``)."""
    fn = stack.inverse if inverse else stack
    compiled = outputs_and_grads(stack, fn, points)
    with hidden_kernels():
        reference = outputs_and_grads(stack, fn, points)
    return compiled, reference


class hidden_kernels:  # noqa: N801 (a context manager used as a statement)
    """Within it, flowprobe runs without the compiled kernels."""

    def __enter__(self):
        native._module, native._error = None, "hidden by the test"

    def __exit__(self, *exc):
        native._module, native._error = MODULE, None


class CountingKernels:
    """The compiled module, counting which of its kernels are called."""

    def __init__(self):
        self.calls = collections.Counter()

    def __getattr__(self, name):
        self.calls[name] += 1
        return getattr(MODULE, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", NATIVE)
def test_compiled_planar_run_equals_the_pytorch_run(activation, dtype, vector_bytes):
    torch.manual_seed(0)
    stack = fp.Planar(3, activation, layers=12).to(dtype)
    perturb(stack, 0.5)
    check(stack, 2 * torch.randn(200, 3, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu"])
def test_compiled_ensemble_run_equals_the_pytorch_run(activation, dtype, vector_bytes):
    """The E members' runs in one compiled call: N not a multiple of the kernel's block of 64 points
    (a full block and a padded one)."""
    torch.manual_seed(2)
    stack = fp.Planar(3, activation, layers=9, ensemble=5).to(dtype)
    perturb(stack, 0.5)
    check(stack, 2 * torch.randn(5, 100, 3, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", NATIVE)
def test_compiled_per_point_run_equals_the_pytorch_run(activation, dtype, vector_bytes, monkeypatch):
    """One parameter set per point (amortised flows: VAE posteriors), each point's parameters in its lane of
    the compiled kernel; 100 points = a full block of 64 and a padded one. Values, log-dets and the
    gradients of the points and of every raw parameter, against the PyTorch layer loop (float64: 1e-12;
    float32: both against the float64 result, the compiled errors at most 4× the PyTorch ones + 1e-6,
    relative to each tensor's largest entry)."""
    torch.manual_seed(3)
    stack = fp.Planar(3, activation, layers=7).to(dtype)
    gen = torch.Generator().manual_seed(4)
    raw = {name: 0.7 * torch.randn(100, *p.shape, generator=gen, dtype=torch.float64)
           for name, p in stack.own_raw().items()}
    z = 2 * torch.randn(100, 3, generator=gen, dtype=torch.float64)
    weights = torch.randn(100, 3, generator=gen, dtype=torch.float64), torch.linspace(-1, 1, 100, dtype=torch.float64)

    def run(kind):
        zz = z.to(kind).requires_grad_(True)
        params = {k: v.to(kind).requires_grad_(True) for k, v in raw.items()}
        x, logdet = stack.to(kind)(zz, params=params)
        loss = (x * weights[0].to(kind)).sum() + (logdet * weights[1].to(kind)).sum()
        return [x.detach(), logdet.detach(), *torch.autograd.grad(loss, [zz, *params.values()])]

    counting = CountingKernels()
    monkeypatch.setattr(native, "_module", counting)
    compiled = run(dtype)
    assert counting.calls["planar_forward"] == 1 and counting.calls["planar_backward"] == 1
    with hidden_kernels():
        reference = run(dtype)
    if dtype == torch.float64:
        assert_same(compiled, reference, 1e-12)
        return
    with hidden_kernels():
        exact = run(torch.float64)
    for got, ref, true in zip(compiled, reference, exact, strict=True):
        scale = true.abs().max().clamp_min(1)
        error, torch_error = ((got - true) / scale).abs().max(), ((ref - true) / scale).abs().max()
        assert error <= 4 * torch_error + 1e-6, (float(error), float(torch_error))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_radial_run_equals_the_pytorch_run(dtype):
    torch.manual_seed(1)
    stack = fp.Radial(4, layers=12).to(dtype)
    perturb(stack, 0.5)
    points = torch.cat([stack.z0.detach()[:1], 2 * torch.randn(199, 4, dtype=dtype)])  # r = 0 at layer 0
    check(stack, points)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["orthogonal", "householder", "triangular"])
def test_compiled_sylvester_inverse_equals_the_pytorch_inverse(kind, dtype, vector_bytes, monkeypatch):
    """The compiled back-substitutions: the Newton inverse (values, log-dets, and the slopes of the implicit
    step) and the Jacobian solve of its backward equal the PyTorch row loops, with and without autograd;
    100 points: a full block of 64 and a padded one; 9 or 10 hidden rows: two chunks of the kernel's 8."""
    torch.manual_seed(3)
    stack = fp.Sylvester(10, hidden=10 if kind == "triangular" else 9, kind=kind, layers=4).to(dtype)
    perturb(stack, 0.5)
    with torch.no_grad():
        x = stack(2 * torch.randn(100, 10, dtype=dtype))[0]
    counting = CountingKernels()
    monkeypatch.setattr(native, "_module", counting)
    check(stack, x, inverse=True, tol64=1e-10)  # Newton steps and row updates in another order
    assert counting.calls["sylvester_newton"] and counting.calls["sylvester_linear"]
    with torch.no_grad():
        compiled = stack.inverse(x)
        with hidden_kernels():
            reference = stack.inverse(x)
    assert_same(compiled, reference, 1e-10 if dtype == torch.float64 else 2e-5)


def test_compiled_sylvester_newton_flags_unconverged_roots_as_the_pytorch_check_does():
    """Too few Newton steps for a large α: the kernel says so (and the inverse falls back), as
    ``tanh_converged`` says of the same roots; with the tabulated budgets every root passes."""
    torch.manual_seed(4)
    m, n = 3, 70
    r = torch.tensor([[3.0, 0.5, -0.2], [0.0, 2.0, 0.3], [0.0, 0.0, 4.0]], dtype=torch.float64)
    r_tilde = torch.tensor([[5.0, 0.1, 0.4], [0.0, 4.0, -0.3], [0.0, 0.0, 3.0]], dtype=torch.float64)
    alpha = r.diagonal() * r_tilde.diagonal()  # 15, 8, 12: the widest bins
    c, b = 10 * torch.randn(m, n, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    tabulated = torch.tensor([fp.activations.TANH_NEWTON.budget(a, torch.float64) for a in alpha.tolist()])
    for budgets, expected in ((torch.ones(m, dtype=torch.int64), False), (tabulated, True)):
        logdet = torch.zeros(n, dtype=torch.float64)
        _, converged = MODULE.sylvester_newton(c, r, r_tilde, b, alpha, budgets, logdet, None)
        assert converged is expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_per_point_reflections_equal_the_pytorch_ones(dtype, monkeypatch):
    """Householder reflections with one vector set per point (VAE posteriors), two leading dimensions:
    the compiled forward and backward give _Reflections' values and gradients, with and without autograd."""
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(3, 70, 6, 5, generator=gen, dtype=dtype)
    v[0, 1, 2] = 0.0  # the identity
    z = torch.randn(3, 70, 5, generator=gen, dtype=dtype)

    def run():
        zz, vv = z.clone().requires_grad_(True), v.clone().requires_grad_(True)
        x = reflect_all(zz, vv)
        grads = torch.autograd.grad((x * torch.linspace(-1, 1, 5, dtype=dtype)).sum(), [zz, vv])
        with torch.no_grad():
            y = reflect_all(z, v)
        return x.detach(), y, *grads

    counting = CountingKernels()
    monkeypatch.setattr(native, "_module", counting)
    compiled = run()
    assert counting.calls["reflections_forward"] == 2 and counting.calls["reflections_backward"] == 1
    with hidden_kernels():
        reference = run()
    assert_same(compiled, reference, 1e-12 if dtype == torch.float64 else 1e-5)


def test_the_compiled_kernel_is_the_one_used_under_autograd():
    stack = fp.Planar(2, "tanh", layers=4)
    x, logdet = stack(torch.randn(5, 2))
    assert type(x.grad_fn).__name__ == "NativeRunBackward"
    with torch.no_grad():
        x, _ = stack(torch.randn(5, 2))
    assert x.grad_fn is None


def test_float32_tanh_and_log1p_of_the_compiled_kernel_over_the_whole_range(vector_bytes):
    """The kernel's own float32 tanh and log1p (vectorised polynomials): within a few float32 ulp of the
    float64 values at every magnitude, both sides of the polynomial switch (|t| = 0.625), huge and non-finite
    pre-activations (NaN stays NaN, ±inf saturates)."""
    stack = fp.Planar(2, "tanh", layers=1)
    stack.set_constrained(torch.tensor([0.3, -0.2]), torch.tensor([1.0, 0.0]), 0.0)  # pre = z₀, wᵀû = 0.3
    pre = torch.cat([torch.linspace(-12, 12, 4001), torch.tensor([0.0, -0.0, 0.625, -0.625, 0.6251, 1e-30, 90.0,
                                                                     -1e4, 3e38, float("inf"), float("-inf")])])
    z = torch.stack([pre, torch.zeros_like(pre)], 1)
    with torch.no_grad():
        p = stack.constrained()
    x, logdet, _, _ = MODULE.planar_forward(z, p.u, p.w, p.b, p.wu, 0)
    h = torch.tanh(pre.double())
    torch.testing.assert_close(x.double(), z.double() + p.u.double() * h.unsqueeze(1), atol=2e-7, rtol=2.4e-7)
    torch.testing.assert_close(logdet.double(), torch.log1p(p.wu.double() * (1 - h * h)), atol=3e-7, rtol=0)
    nan = torch.full((1, 2), float("nan"))
    assert MODULE.planar_forward(nan, p.u, p.w, p.b, p.wu, 0)[1].isnan().all()


def test_compiled_planar_gradients_do_not_depend_on_threads_and_a_member_gets_its_solo_gradients():
    """Each block's parameter gradients are summed over the blocks in a fixed order: the same bits on 1 and 2
    threads, and a member of an ensemble gets exactly the gradients of the same flow trained alone."""
    torch.manual_seed(4)
    flow = fp.Flow(fp.StandardNormal(2), [fp.Planar(2, "tanh", layers=6, ensemble=3)])
    perturb(flow, 0.5)
    points = 2 * torch.randn(3, 100, 2)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(outputs_and_grads(flow, flow, points))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(runs[0][2], runs[1][2], strict=True):
        assert torch.equal(a, b)
    solo = flow.member(1)
    x, logdet, grads = outputs_and_grads(solo, solo, points[1])
    assert torch.equal(x, runs[0][0][1]) and torch.equal(logdet, runs[0][1][1])
    for member_grad, solo_grad in zip(runs[0][2][1:], grads[1:], strict=True):
        assert torch.equal(member_grad[1], solo_grad)


@pytest.mark.parametrize("slopes", [[1e12] * 6, [-0.9999999] * 3 + [0.5] * 3, [0.5, 3.0, -0.5, 1e-9, 7.0, 0.25],
                                    [0.5, -1.0, 0.5]])
def test_float32_log_det_of_the_compiled_kernel_with_huge_and_tiny_slopes(slopes, vector_bytes):
    """float32 sums the log-det terms of 4 layers as one log of their product where it cannot overflow or
    underflow; products out of range (1 + wᵀû h' of 10¹² per layer, or 0) fall back to a log per layer."""
    k = len(slopes)
    z = torch.zeros(20, 2)  # pre-activation b = 0: h' = 1, so the log-det is Σ log(1 + wᵀû)
    u, w, b = torch.zeros(k, 2), torch.zeros(k, 2), torch.zeros(k)
    wu = torch.tensor(slopes)
    _, logdet, _, _ = MODULE.planar_forward(z, u, w, b, wu, 0)
    exact = torch.log1p(wu.double()).sum()  # of the float32 slopes
    torch.testing.assert_close(logdet.double(), exact.expand(20), rtol=1e-6, atol=1e-6)


def test_compiled_planar_kernel_with_no_points():
    """N = 0 (the layers refuse it; the kernel called directly must not read past its buffers): zero gradients."""
    z, u, b = torch.zeros(2, 0, 2), torch.ones(3, 2, 2), torch.ones(3, 2)
    x, logdet, inputs, kept = MODULE.planar_forward(z, u, u, b, b, 0)
    assert x.shape == (2, 0, 2) and logdet.shape == (2, 0)
    for grad in MODULE.planar_backward(x, logdet, inputs, kept, u, u, b, 0)[1:]:
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 15, 16, 300])
def test_compiled_member_noise_is_each_generators_randn(dtype, n):
    """An ensemble's training noise in one call: member m's block is bit for bit what torch.randn draws from
    its generator (sizes below and above ATen's 16-value vectorised path), and each generator advances as
    randn advances it."""
    seeds = [5, 0, 123]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    out = torch.empty(3, n, 2, dtype=dtype)
    MODULE.normal_members(out, generators)
    MODULE.normal_members(out, generators)  # a second draw: the generators moved on as randn moves them
    for m, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        torch.randn(n, 2, generator=g, dtype=dtype)
        assert torch.equal(out[m], torch.randn(n, 2, generator=g, dtype=dtype))
    with pytest.raises(RuntimeError, match="one row per generator"):
        MODULE.normal_members(out, generators[:2])


def test_compiled_member_draws_in_parallel_or_in_member_order_with_a_shared_generator():
    """16 members with generators of their own draw in parallel (2 threads) and still get each generator's
    numbers; members that share one generator object draw from it in member order, as a loop of randn /
    randint calls would (a parallel draw would interleave them at random)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generators = [torch.Generator().manual_seed(s) for s in range(16)]
        out = torch.empty(16, 256, 2)
        MODULE.normal_members(out, generators)
        for m in range(16):
            assert torch.equal(out[m], torch.randn(256, 2, generator=torch.Generator().manual_seed(m)))
        shared = torch.Generator().manual_seed(9)
        generators = [torch.Generator().manual_seed(1), shared, shared, torch.Generator().manual_seed(2), shared]
        reference = torch.Generator().manual_seed(9)
        for draw in range(200):  # forced parallel, a race showed in 1 of 20 draws
            MODULE.normal_members(out[:5], generators)
            expected = [torch.randn(256, 2, generator=reference) for _ in range(3)]
            assert all(torch.equal(out[m], e) for m, e in zip((1, 2, 4), expected, strict=True)), draw
            indices = torch.empty(5, 64, dtype=torch.long)
            MODULE.randint_members(indices, 1000, generators)
            expected = [torch.randint(0, 1000, (64,), generator=reference) for _ in range(3)]
            assert all(torch.equal(indices[m], e) for m, e in zip((1, 2, 4), expected, strict=True)), draw
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("high", [1, 7, 8192, 2**40])
def test_compiled_member_indices_are_each_generators_randint(high):
    """An ensemble's mini-batch indices in one call: member m's row is bit for bit torch.randint(0, high) of
    its generator (ranges below and above 2³², which ATen draws with 32 and 64 random bits)."""
    seeds = [3, 1, 4, 1 << 40]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    out = torch.empty(4, 300, dtype=torch.long)
    MODULE.randint_members(out, high, generators)
    MODULE.randint_members(out, high, generators)
    for m, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        torch.randint(0, high, (300,), generator=g)
        assert torch.equal(out[m], torch.randint(0, high, (300,), generator=g))
    with pytest.raises(RuntimeError, match="int64 out"):
        MODULE.randint_members(out.int(), high, generators)
