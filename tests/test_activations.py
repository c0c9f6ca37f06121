"""Activations: ``h'`` and ``h''`` agree with autograd on both sides of 0 and at extreme inputs."""

import pytest
import torch

from flowprobe.activations import ACTIVATIONS

POINTS = torch.tensor([-60.0, -7.0, -1.3, -0.2, -1e-3, 1e-3, 0.4, 1.0, 3.0, 25.0, 60.0], dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_derivatives_match_autograd(name):
    act = ACTIVATIONS[name]
    t = POINTS.clone().requires_grad_(True)
    (first,) = torch.autograd.grad(act.fn(t).sum(), t, create_graph=True)
    if first.requires_grad:
        (second,) = torch.autograd.grad(first.sum(), t, allow_unused=True, materialize_grads=True)
    else:  # h' constant (identity): no graph to differentiate
        second = torch.zeros_like(POINTS)
    torch.testing.assert_close(act.derivative(POINTS), first.detach(), atol=1e-15, rtol=1e-13)
    torch.testing.assert_close(act.second_derivative(POINTS), second, atol=1e-15, rtol=1e-12)
    assert float(act.derivative(POINTS).max()) <= act.sup_derivative


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_derivatives_return_new_tensors(name):
    """Fused runs update h' and h'' in place: they must never alias the input."""
    act = ACTIVATIONS[name]
    t = POINTS.clone()
    for fn in (act.derivative, act.second_derivative):
        assert fn(t).data_ptr() != t.data_ptr()
