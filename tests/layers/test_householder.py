"""Householder layers: involution, unit determinant, the reflection product."""

import math

import pytest
import torch

import flowprobe as fp
from flowprobe.layers.householder import householder_matrix


def test_householder_is_an_involution_with_unit_determinant():
    layer = fp.Householder(4, reflections=1).double()
    z = torch.randn(10, 4, dtype=torch.float64)
    x, logdet = layer(z)
    assert torch.equal(logdet, torch.zeros(10, dtype=torch.float64))
    assert (layer(x)[0] - z).abs().max() < 1e-14  # H² = I
    h = householder_matrix(layer.v.detach()[0], 4, 4)
    assert (h @ h - torch.eye(4, dtype=torch.float64)).abs().max() < 1e-14
    assert math.isclose(float(torch.linalg.det(h)), -1.0, abs_tol=1e-12)


def test_bad_reflection_count_is_named():
    with pytest.raises(ValueError, match="reflections must be a positive integer"):
        fp.Householder(3, reflections=0)
