"""Shared test harness: every registered layer family × configuration as a case, and reference Jacobians."""

from __future__ import annotations

import torch
from torch.func import jacrev, vmap

from flowprobe.layers import FlowLayer, families

SMOOTH = ["tanh", "sigmoid", "arctan", "softplus", "elu"]
PIECEWISE = ["relu", "leaky_relu", "identity"]


def layer_cases(dim: int = 3) -> dict[str, tuple[type[FlowLayer], dict]]:
    """case name -> (family class, constructor keywords) for every example of every registered family."""
    return {case: (fam.cls, kwargs) for fam in families().values() for case, kwargs in fam.examples(dim).items()}


CASES = layer_cases()


def make(case: str, dim: int = 3, dtype=torch.float64, layers: int = 1, ensemble=()) -> FlowLayer:
    """A stack of the case's family (cases are built for ``dim = 3``; others rebuild the table)."""
    cls, kwargs = (CASES if dim == 3 else layer_cases(dim))[case]
    return cls(dim, layers=layers, ensemble=ensemble, **kwargs).to(dtype)


def perturb(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Move every parameter away from the (near-identity) initialisation."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def autograd_logdet(layer, z: torch.Tensor, with_accuracy: bool = False):
    """log|det ∂x/∂z| from the full autograd Jacobian of a stack (or view), point by point.

    With ``with_accuracy``, also the reference's own accuracy: LU-based ``slogdet`` is accurate to
    about ``d·eps·cond(J)`` (used for adversarial parameters where ``J`` is ill-conditioned).
    """
    jac = vmap(jacrev(lambda v: forward_plain(layer, v.unsqueeze(0))[0].squeeze(0)))(z)
    logdet = torch.linalg.slogdet(jac).logabsdet
    if not with_accuracy:
        return logdet
    eps = torch.finfo(jac.dtype).eps
    return logdet, 10 * z.shape[1] * eps * torch.linalg.cond(jac)


def forward_plain(layer, z: torch.Tensor):
    """The layer's forward without validation (usable inside ``torch.func`` transforms)."""
    stack = getattr(layer, "stack", layer)
    p = layer.constrained()
    return stack.forward_run(z, p)


def inverse_plain(layer, x: torch.Tensor):
    """The layer's inverse without validation."""
    stack = getattr(layer, "stack", layer)
    return stack.inverse_run(x, layer.constrained())


def set_raw(layer: FlowLayer, values: dict) -> None:
    """Set a one-layer stack's raw parameters (per-layer shapes; every ensemble member alike)."""
    for name, value in values.items():
        layer._write(name, 0, torch.as_tensor(value))


def batch_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """Per-row Jacobians ``(N, d, d)`` of a row-wise map (rows independent), by autograd."""
    jac = torch.autograd.functional.jacobian(lambda v: fn(v).sum(0), x)  # (d, N, d)
    return jac.permute(1, 0, 2)


def outputs_and_grads(module: torch.nn.Module, fn, points: torch.Tensor):
    """``fn(points)``'s output and log-det, and the gradients of a fixed scalar of them with respect to
    the points and every parameter of ``module``."""
    points = points.clone().requires_grad_(True)
    out, logdet = fn(points)
    loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum() + 0.7 * logdet.sum()
    grads = torch.autograd.grad(loss, [points, *module.parameters()])
    return out.detach(), logdet.detach(), grads


def assert_same(a, b, tol: float) -> None:
    """Nested tuples of tensors equal to ``tol`` (absolute and relative)."""
    for x, y in zip(a, b, strict=True):
        if isinstance(x, tuple):
            assert_same(x, y, tol)
        else:
            torch.testing.assert_close(x, y, atol=tol, rtol=tol)
