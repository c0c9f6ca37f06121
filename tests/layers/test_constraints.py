"""Invertibility for *any* raw parameter value, in the arithmetic actually used (float32 and float64)."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from tests.conftest import DTYPES
from tests.helpers import CASES, autograd_logdet, make, set_raw

import flowprobe as fp
from flowprobe.layers import families

GUARANTEED = sorted(case for case, (cls, _) in CASES.items() if families()[cls.family].guaranteed)
DRAWS = 10_000


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", [f for f in families().values() if f.guaranteed], ids=lambda f: f.name)
def test_ten_thousand_raw_draws_up_to_1e4_keep_the_constraint(family, dtype):
    """10⁴ raw parameter sets per family, uniform in [−1e4, 1e4], shared among its examples (each an
    ensemble of one-layer stacks, one batched evaluation): the reported margin keeps its bound, and
    forward and inverse are finite.

    The inverse's *accuracy* at such values is that of a map with condition number up to ~1e8
    (‖û‖‖w‖ ~ 1e8 for planar); it is tested where it is well defined, below."""
    torch.manual_seed(0)
    examples = family.examples(3)
    members = -(-DRAWS // len(examples))
    for case, kwargs in examples.items():
        layer = family.cls(3, ensemble=members, **kwargs).to(dtype)
        with torch.no_grad():
            for p in layer.parameters():
                p.uniform_(-1e4, 1e4)
        report = layer.invertibility()
        floor = getattr(layer, "min_slope", 0.0)
        assert report.invertible and report.margin >= floor * (1 - 1e-3), (case, report)
        z = torch.rand(members, 4, 3, dtype=dtype) * 20 - 10
        with torch.no_grad():
            x, logdet = layer(z)
            z_back, logdet_inv = layer.inverse(x)
        for t in (x, logdet, z_back, logdet_inv):
            assert torch.isfinite(t).all(), case


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "arctan", "softplus", "relu"])
def test_planar_float32_raw_values_of_order_1e3_stay_invertible(activation):
    """The reported failure: 1000 float32 planar layers with raw values of order 1e3 had wᵀû ≤ −1 in
    114 cases (invertibility() False, ZeroDivisionError in the inverse)."""
    torch.manual_seed(0)
    layer = fp.Planar(2, activation, ensemble=1000)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 1e3)
    alpha = layer.constrained().wu.detach()
    assert float((1 + alpha * layer.act.sup_derivative).min()) >= layer.min_slope * (1 - 1e-6)
    assert layer.invertibility().invertible
    x, _ = layer(torch.randn(1000, 4, 2))
    z, logdet_inv = layer.inverse(x)
    assert torch.isfinite(z).all() and torch.isfinite(logdet_inv).all()


EXTREME = st.one_of(
    st.floats(-1e3, 1e3, allow_subnormal=False),
    st.sampled_from([0.0, -1e3, 1e3, -60.0, 60.0, 1e-8]),
)


@st.composite
def raw_parameters(draw, layer):
    return {
        name: draw(arrays(np.float64, shape, elements=EXTREME))
        for name, shape in layer.raw_shapes().items()
    }


@pytest.mark.parametrize("case", GUARANTEED)
@given(data=st.data())
def test_any_raw_parameters_give_an_accurate_inverse(case, data):
    """Adversarial raw values (hypothesis): exact log-det and inverse to the accuracy the problem allows."""
    layer = make(case)
    set_raw(layer, data.draw(raw_parameters(layer)))
    report = layer.invertibility()
    assert report.invertible
    if hasattr(layer, "min_slope"):  # the margin holds up to rounding of raw values as large as 1e3
        assert report.margin >= layer.min_slope * (1 - 1e-6)
    z = torch.rand(32, 3, dtype=torch.float64) * 20 - 10
    x, logdet = layer(z)
    assert torch.isfinite(x).all() and torch.isfinite(logdet).all()
    reference, accuracy = autograd_logdet(layer, z, with_accuracy=True)
    assert ((logdet - reference).abs() - accuracy).max() < 1e-8
    z_back, logdet_inv = layer.inverse(x)
    scale = 1 + x.abs().max()
    assert (z_back - z).abs().max() < 1e-8 * scale
    assert torch.isfinite(logdet_inv).all()
