"""Shared test harness: every layer family × activation as a case, and reference Jacobians."""

from __future__ import annotations

import torch
from torch.func import jacrev, vmap

import flowprobe as fp
from flowprobe.activations import ACTIVATIONS

SMOOTH = ["tanh", "sigmoid", "arctan", "softplus", "elu"]
PIECEWISE = ["relu", "leaky_relu", "identity"]


def layer_cases() -> dict:
    """name -> factory(dim) for every layer configuration under test."""
    cases = {f"planar-{a}": (lambda d, a=a: fp.Planar(d, a)) for a in ACTIVATIONS}
    cases["radial"] = fp.Radial
    for kind in ("orthogonal", "householder", "triangular"):
        for a in ("tanh", "sigmoid", "softplus", "elu", "relu", "leaky_relu"):
            hidden = None if kind == "triangular" else "less"
            cases[f"sylvester-{kind}-{a}"] = lambda d, k=kind, a=a, h=hidden: fp.Sylvester(
                d, hidden=d if h is None else max(1, d - 1), kind=k, activation=a
            )
    cases["sylvester-triangular-flip"] = lambda d: fp.Sylvester(d, kind="triangular", flip=True)
    cases["householder"] = lambda d: fp.Householder(d, reflections=3)
    cases["general-sylvester"] = lambda d: fp.GeneralSylvester(d, hidden=2)
    return cases


CASES = layer_cases()


def autograd_logdet(layer, z: torch.Tensor, params=None, with_accuracy: bool = False):
    """log|det ∂x/∂z| from the full autograd Jacobian, point by point.

    With ``with_accuracy``, also the reference's own accuracy: LU-based ``slogdet`` is accurate to
    about ``d·eps·cond(J)`` (used for adversarial parameters where ``J`` is ill-conditioned).
    """
    p = layer.constrained() if params is None else params

    def single(v):
        return layer.transform(v.unsqueeze(0), p)[0].squeeze(0)

    jac = vmap(jacrev(single))(z)
    logdet = torch.linalg.slogdet(jac).logabsdet
    if not with_accuracy:
        return logdet
    eps = torch.finfo(jac.dtype).eps
    return logdet, 10 * z.shape[1] * eps * torch.linalg.cond(jac)


def set_raw(layer, values: dict) -> None:
    with torch.no_grad():
        for name, value in values.items():
            getattr(layer, name).copy_(torch.as_tensor(value))


def batch_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """Per-row Jacobians ``(N, d, d)`` of a row-wise map (rows independent), by autograd."""
    jac = torch.autograd.functional.jacobian(lambda v: fn(v).sum(0), x)  # (d, N, d)
    return jac.permute(1, 0, 2)
