"""Householder layers: involution, unit determinant, the reflection product."""

import math

import pytest
import torch
from tests.helpers import autograd_logdet, set_raw

import flowprobe as fp
from flowprobe.layers import fused_kernels
from flowprobe.layers.householder import householder_matrix, reflect_all


def test_householder_is_an_involution_with_unit_determinant():
    layer = fp.Householder(4, reflections=1).double()
    z = torch.randn(10, 4, dtype=torch.float64)
    x, logdet = layer(z)
    assert torch.equal(logdet, torch.zeros(10, dtype=torch.float64))
    assert (layer(x)[0] - z).abs().max() < 1e-14  # H² = I
    h = householder_matrix(layer.v.detach()[0], 4, 4)
    assert (h @ h - torch.eye(4, dtype=torch.float64)).abs().max() < 1e-14
    assert math.isclose(float(torch.linalg.det(h)), -1.0, abs_tol=1e-12)


@pytest.mark.parametrize("count", [0, 100_000_000])
def test_bad_reflection_counts_are_named(count):
    with pytest.raises(ValueError, match=r"reflections must be an integer in \[1, 4096\]"):
        fp.Householder(3, reflections=count)


@pytest.mark.parametrize("scale", [1.877e-155, 1e150])
def test_reflections_of_tiny_and_huge_vectors_stay_orthogonal(scale):
    """``v`` of 1e-155 made ‖v‖² underflow: the 'reflection' was no longer orthogonal (log-det off by 0.2)."""
    layer = fp.Householder(3, reflections=3).double()
    pattern = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    set_raw(layer, {"v": torch.full((3, 3), scale, dtype=torch.float64) * pattern})
    z = torch.randn(6, 3, dtype=torch.float64)
    x, logdet = layer(z)
    assert (logdet - autograd_logdet(layer, z)).abs().max() < 1e-12
    assert (x.norm(dim=-1) - z.norm(dim=-1)).abs().max() < 1e-12
    assert (layer.inverse(x)[0] - z).abs().max() < 1e-12


def test_per_point_reflections_with_the_analytic_backward_equal_autograd():
    """``reflect_all`` with one vector set per point (zero and tiny vectors included) against the
    reflections differentiated by autograd (``fused_kernels(False)``): values and gradients to 1e-12
    (relative for the gradients of the tiny vectors, which are of order 1e160)."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(7, 5, 4, generator=gen, dtype=torch.float64)
    v[0, 1] = 0.0
    v[2, 3] *= 1e-160
    z = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    results = []
    for fused in (True, False):
        zz, vv = z.clone().requires_grad_(True), v.clone().requires_grad_(True)
        with fused_kernels(fused):
            x = reflect_all(zz, vv)
        assert (x.grad_fn.name() == "_ReflectionsBackward") == fused
        results.append((x.detach(), *torch.autograd.grad((x * weight).sum(), [zz, vv])))
    for fast, reference in zip(*results):
        torch.testing.assert_close(fast, reference, atol=1e-12, rtol=1e-12)  # ∂/∂v of a tiny v is huge
    assert (results[0][0].norm(dim=-1) - z.norm(dim=-1)).abs().max() < 1e-12
