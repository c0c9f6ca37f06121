"""Amortised flow posteriors as the VAE uses them: every point's parameters come from the encoder
through the layers' one parameter mechanism, with the plain layers' log-dets, inverses and
constraints, per point, in float32 and float64."""

import pytest
import torch
from tests.conftest import DTYPES
from torch.func import jacrev

from flowprobe.vae.model import PRESETS, FlowVAE, posterior_spec
from flowprobe.validation import validation

SPECS = ["planar:3:tanh", "radial:3", "householder:3", "sylvester:3:orthogonal:m=2", "sylvester:3:householder",
         "sylvester:3:triangular"]
TOL = {torch.float64: dict(logdet=1e-9, trip=1e-9), torch.float32: dict(logdet=2e-4, trip=2e-4)}
EXACT = 1e-12
LATENT = 4


def _model(spec, dtype=torch.float64):
    model = FlowVAE(6, latent=LATENT, hidden=8, depth=1, flow=spec).to(dtype)
    with torch.no_grad():  # the head starts at 0 (every point alike): give each point its own parameters
        model.head.weight.normal_(0, 0.5)
    return model


def _posterior(model, n=5):
    x = (torch.rand(n, 6, generator=torch.Generator().manual_seed(1)) < 0.5).to(model.mean.weight.dtype)
    return model.encode(x)


def _point(params, i):
    return [{k: v[i : i + 1] for k, v in p.items()} for p in params]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPECS)
def test_per_point_log_det_matches_autograd_slogdet(spec, dtype):
    model = _model(spec, dtype)
    post = _posterior(model)
    z = 1.5 * torch.randn(5, LATENT, dtype=torch.float64)
    _, logdet = model.flow(z.to(dtype), params=post.params)
    logdet = logdet.detach()
    reference = _model(spec).double()
    reference.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ref_params = _posterior(reference).params
    for i in range(5):
        jac = jacrev(lambda v, i=i: reference.flow(v.unsqueeze(0), params=_point(ref_params, i))[0].squeeze(0))(z[i])
        expected = torch.linalg.slogdet(jac).logabsdet
        assert logdet.dtype == dtype
        assert abs(float(logdet[i]) - float(expected)) < TOL[dtype]["logdet"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPECS)
def test_per_point_inverse_round_trip(spec, dtype):
    model = _model(spec, dtype)
    post = _posterior(model, n=64)
    z = (3 * torch.randn(64, LATENT, dtype=torch.float64)).to(dtype)
    with torch.no_grad():
        x, logdet = model.flow(z, params=post.params)
        z_back, logdet_inv = model.flow.inverse(x, params=post.params)
    assert (z_back - z).abs().max() < TOL[dtype]["trip"]
    assert (logdet + logdet_inv).abs().max() < TOL[dtype]["logdet"]


@pytest.mark.parametrize("spec", SPECS)
def test_per_point_parameters_equal_plain_stacks_loaded_with_them(spec):
    """Point ``i`` through the amortised flow = a plain stack holding point ``i``'s raw parameters,
    both directions, to 1e-12."""
    model = _model(spec)
    post = _posterior(model)
    z = torch.randn(5, LATENT, dtype=torch.float64)
    x, logdet = model.flow(z, params=post.params)
    z_back, logdet_inv = model.flow.inverse(x, params=post.params)
    plain = FlowVAE(6, latent=LATENT, hidden=8, depth=1, flow=spec).double().flow
    for i in range(5):
        with torch.no_grad():
            for stack, p in zip(plain.stacks, post.params):
                for name, value in p.items():
                    getattr(stack, name).copy_(value[i])
        xi, ldi = plain(z[i : i + 1])
        zi, ldii = plain.inverse(x[i : i + 1])
        assert (xi - x[i]).abs().max() < EXACT and (ldi - logdet[i]).abs().max() < EXACT
        assert (zi - z_back[i]).abs().max() < EXACT and (ldii - logdet_inv[i]).abs().max() < EXACT


@pytest.mark.parametrize("spec", SPECS)
def test_samples_broadcast_against_the_points_parameters(spec):
    """``S`` samples per point ``(S, N, d)`` with parameters ``(N, …)`` (the importance sampler's layout)
    equal the same samples with the parameters copied for every sample."""
    model = _model(spec)
    post = _posterior(model, n=3)
    z = torch.randn(4, 3, LATENT, dtype=torch.float64)
    with validation(False):
        x, logdet = model.flow(z, params=post.params)
    copied = [{k: v.repeat(4, *[1] * (v.dim() - 1)) for k, v in p.items()} for p in post.params]
    x_flat, logdet_flat = model.flow(z.reshape(12, LATENT), params=copied)
    assert (x.reshape(12, LATENT) - x_flat).abs().max() < EXACT
    assert (logdet.reshape(12) - logdet_flat).abs().max() < EXACT


def test_orthogonal_sylvester_bases_are_orthonormal_per_point():
    """O-SNF's ``Q`` is exactly orthonormal for every point (Householder QR; van den Berg et al.'s
    iterative orthogonalisation stops at ‖QᵀQ − I‖_F ≤ 1e-6)."""
    model = _model("sylvester:3:orthogonal:m=2")
    stack = model.flow.stacks[0]
    q = stack.constrained(_posterior(model, n=7).params[0]).q  # (K, N, d, m)
    eye = torch.eye(2, dtype=torch.float64)
    assert q.shape == (3, 7, LATENT, 2)
    assert (q.transpose(-1, -2) @ q - eye).abs().max() < 1e-14


@pytest.mark.parametrize("name", PRESETS[1:])
def test_every_point_starts_with_the_stacks_own_parameters(name):
    """At initialisation the head's weight is 0: each point's raw parameters are the stack's own, and
    the amortised flow is the plain flow."""
    model = FlowVAE(6, latent=LATENT, hidden=8, depth=1, flow=name).double()
    assert model.spec == posterior_spec(name, LATENT)
    post = _posterior(model, n=3)
    for stack, p in zip(model.flow.stacks, post.params):
        for key, value in stack.own_raw().items():
            assert torch.equal(p[key], value.expand_as(p[key]))
    z = torch.randn(3, LATENT, dtype=torch.float64)
    torch.testing.assert_close(model.flow(z, params=post.params), model.flow(z), atol=1e-12, rtol=0)


def test_one_seed_gives_every_posterior_the_same_encoder_and_decoder():
    """The table compares posteriors seed by seed: only the flow's own parameters may differ."""
    models = []
    for name in PRESETS:
        torch.manual_seed(3)
        models.append(FlowVAE(6, latent=LATENT, hidden=8, depth=1, flow=name).state_dict())
    shared = [k for k in models[0] if k.split(".")[0] in ("encoder", "mean", "log_var", "decoder")]
    assert len(shared) == 10
    for state in models[1:]:
        for key in shared:
            assert torch.equal(state[key], models[0][key]), key


def test_gradients_reach_the_head_and_the_stacks():
    model = _model("sylvester:2:orthogonal:m=2")
    x = (torch.rand(8, 6) < 0.5).double()
    with validation(False):
        model(x, torch.randn(8, LATENT, dtype=torch.float64)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_log_weights_of_a_plain_vae_are_the_gaussian_formula():
    """No flow: ``log p(z) − log q(z|x)`` is the Gaussian log-ratio at ``z = μ + σε``."""
    model = FlowVAE(6, latent=LATENT, hidden=8, depth=1).double()
    x = (torch.rand(5, 6) < 0.5).double()
    eps = torch.randn(5, LATENT, dtype=torch.float64)
    terms = model.log_weights(x, eps)
    post = model.encode(x)
    z = post.mean + torch.exp(0.5 * post.log_var) * eps
    q = torch.distributions.Normal(post.mean, torch.exp(0.5 * post.log_var)).log_prob(z).sum(-1)
    p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(terms.log_ratio, p - q, atol=1e-12, rtol=0)
    logits = model.decoder(z)
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    torch.testing.assert_close(terms.log_lik, expected, atol=1e-12, rtol=0)


def test_log_det_enters_the_posterior_density():
    """With a flow, ``log q_K(z_K) = log q_0(z_0) − log|det J|``: the weight changes by exactly the log-det."""
    model = _model("planar:3:tanh")
    x = (torch.rand(5, 6) < 0.5).double()
    eps = torch.randn(5, LATENT, dtype=torch.float64)
    post = model.encode(x)
    z0 = post.mean + torch.exp(0.5 * post.log_var) * eps
    zk, logdet = model.flow(z0, params=post.params)
    q0 = torch.distributions.Normal(post.mean, torch.exp(0.5 * post.log_var)).log_prob(z0).sum(-1)
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(zk).sum(-1)
    torch.testing.assert_close(model.log_weights(x, eps).log_ratio, prior - (q0 - logdet), atol=1e-12, rtol=0)
