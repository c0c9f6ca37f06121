"""Sylvester layers (van den Berg, Hasenclever, Tomczak & Welling, 2018) and the general
residual form ``z + A h(Bᵀz + b)`` studied by Kong & Chaudhuri (2020)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from flowprobe.activations import Activation, get_activation
from flowprobe.layers.base import FlowLayer, InverseNotAvailable, Invertibility, normal_init
from flowprobe.layers.householder import householder_matrix
from flowprobe.layers.planar import DEFAULT_MIN_SLOPE
from flowprobe.layers.scalar import solve_scalar

__all__ = ["GeneralSylvester", "Sylvester", "SylvesterParams", "vecmat"]

KINDS = ("orthogonal", "householder", "triangular")
DEFAULT_HOUSEHOLDER_REFLECTIONS = 8  # as in the official SNF code


def vecmat(v: Tensor, m: Tensor) -> Tensor:
    """Row vectors times matrices: ``(N, r) @ (..., r, c) -> (N, c)`` (``m`` batched or not)."""
    return (v.unsqueeze(-2) @ m).squeeze(-2)


class SylvesterParams(NamedTuple):
    """Constrained VdB Sylvester parameters; leading batch dimensions optional."""

    q: Tensor  # (..., d, m), orthonormal columns
    r: Tensor  # (..., m, m), upper triangular
    r_tilde: Tensor  # (..., m, m), upper triangular
    b: Tensor  # (..., m)


class Sylvester(FlowLayer):
    r"""Sylvester layer in van den Berg's form :math:`x = z + Q R\, h(\tilde R Q^\top z + b)`.

    ``Q ∈ R^{d×m}`` has orthonormal columns, ``R`` and ``R̃`` are upper triangular. The three
    variants differ in how ``Q`` is built:

    * ``orthogonal`` (O-SNF, ``m ≤ d``): an orthonormal basis of the column space of a free
      ``d×m`` matrix. VdB orthogonalise iteratively; we use Householder QR, which is exactly
      orthonormal for *every* raw value (the exact log-det below relies on ``QᵀQ = I``).
    * ``householder`` (H-SNF): the first ``m`` columns of a product of ``reflections``
      Householder matrices (default 8, as in the official code; ``m ≤ d``).
    * ``triangular`` (T-SNF, ``m = d``): ``Q`` is the identity, or the reversal permutation
      if ``flip=True`` (stacks alternate).

    Log-det: :math:`\sum_i \log|1 + h'((\tilde R Q^\top z + b)_i)\, R_{ii}\tilde R_{ii}|`.

    Constraint: ``R = triu(D, 1) + diag(s·tanh d₁)``, ``R̃ = triu(Dᵀ, 1) + diag(s·tanh d₂)`` with
    ``s = sqrt((1−ε)/sup h')``, so ``R_ii R̃_ii ≥ −(1−ε)/sup h'`` for any raw value (VdB's tanh
    diagonals, scaled to the activation and a margin ``ε = min_slope``).

    Inverse: ``r = Qᵀx``, the part of ``x`` outside ``range(Q)`` is untouched, and
    ``v + R h(R̃v + b) = r`` is solved by back-substitution, one scalar monotone equation per row
    from ``i = m`` down to 1; then ``z = Qv + (I − QQᵀ)x``.

    Args:
        dim: Dimension ``d``.
        hidden: Number of neurons ``m`` (default ``d``).
        kind: ``orthogonal``, ``householder`` or ``triangular``.
        activation: Any activation of :mod:`flowprobe.activations`.
        reflections: Reflections per layer for ``householder``.
        flip: For ``triangular``: use the reversal permutation as ``Q``.
        min_slope: ``ε`` in ``(0, 1]``.

    References:
        R. van den Berg, L. Hasenclever, J. M. Tomczak, M. Welling. Sylvester Normalizing Flows
        for Variational Inference. UAI 2018. https://arxiv.org/abs/1803.05649
    """

    def __init__(
        self,
        dim: int,
        hidden: int | None = None,
        kind: str = "orthogonal",
        activation: str | Activation = "tanh",
        reflections: int = DEFAULT_HOUSEHOLDER_REFLECTIONS,
        flip: bool = False,
        min_slope: float = DEFAULT_MIN_SLOPE,
    ) -> None:
        super().__init__(dim)
        hidden = dim if hidden is None else hidden
        if kind not in KINDS:
            raise ValueError(f"unknown Sylvester kind {kind!r}; expected one of: {', '.join(KINDS)}")
        if not 1 <= hidden <= dim:
            raise ValueError(f"hidden must lie in [1, dim={dim}], got {hidden}")
        if kind == "triangular" and hidden != dim:
            raise ValueError(f"triangular Sylvester layers need hidden == dim ({dim}), got {hidden}")
        if not 0 < min_slope <= 1:
            raise ValueError(f"min_slope must lie in (0, 1], got {min_slope}")
        self.hidden, self.kind, self.flip = hidden, kind, bool(flip)
        self.act = get_activation(activation)
        self.min_slope = float(min_slope)
        self.diag_scale = math.sqrt((1 - self.min_slope) / self.act.sup_derivative)
        if kind == "orthogonal":
            self.q = normal_init((dim, hidden), 1.0)
        elif kind == "householder":
            self.v = normal_init((reflections, dim), 1.0)
        self.D = normal_init((hidden, hidden), 0.1 / hidden**0.5)
        self.d1 = normal_init((hidden,), 0.5)
        self.d2 = normal_init((hidden,), 0.5)
        self.b = nn.Parameter(torch.zeros(hidden))

    def _basis(self, raw: dict[str, Tensor], like: Tensor) -> Tensor:
        if self.kind == "orthogonal":
            return torch.linalg.qr(raw["q"]).Q
        if self.kind == "householder":
            return householder_matrix(raw["v"], self.dim, self.hidden)
        eye = torch.eye(self.dim, dtype=like.dtype, device=like.device)
        return eye.flip(-1) if self.flip else eye

    def constrain(self, raw: dict[str, Tensor]) -> SylvesterParams:
        d = raw["D"]
        scale = self.diag_scale
        r = torch.triu(d, 1) + torch.diag_embed(scale * torch.tanh(raw["d1"]))
        r_tilde = torch.triu(d.transpose(-1, -2), 1) + torch.diag_embed(scale * torch.tanh(raw["d2"]))
        return SylvesterParams(self._basis(raw, d), r, r_tilde, raw["b"])

    def _diag_product(self, p: SylvesterParams) -> Tensor:
        return torch.diagonal(p.r, dim1=-2, dim2=-1) * torch.diagonal(p.r_tilde, dim1=-2, dim2=-1)

    def transform(self, z: Tensor, p: SylvesterParams) -> tuple[Tensor, Tensor]:
        pre = vecmat(vecmat(z, p.q), p.r_tilde.transpose(-1, -2)) + p.b
        x = z + vecmat(vecmat(self.act.fn(pre), p.r.transpose(-1, -2)), p.q.transpose(-1, -2))
        logdet = torch.log1p(self.act.derivative(pre) * self._diag_product(p)).sum(-1)
        return x, logdet

    def invert(self, x: Tensor, p: SylvesterParams) -> tuple[Tensor, Tensor]:
        coords = vecmat(x, p.q)  # (N, m)
        outside = x - vecmat(coords, p.q.transpose(-1, -2))
        r_diag = torch.diagonal(p.r, dim1=-2, dim2=-1)
        rt_diag = torch.diagonal(p.r_tilde, dim1=-2, dim2=-1)
        solved: list[Tensor] = []  # v_i, i = m-1 .. 0 prepended
        pre: list[Tensor] = []
        v_after = x.new_zeros(x.shape[0], 0)
        h_after = x.new_zeros(x.shape[0], 0)
        for i in reversed(range(self.hidden)):
            gamma = p.b[..., i] + (p.r_tilde[..., i, i + 1 :] * v_after).sum(-1)
            known = (p.r[..., i, i + 1 :] * h_after).sum(-1)
            v_i = solve_scalar(coords[:, i] - known, r_diag[..., i], rt_diag[..., i], gamma, self.act)
            pre_i = rt_diag[..., i] * v_i + gamma
            solved.insert(0, v_i)
            pre.insert(0, pre_i)
            v_after = torch.cat([v_i.unsqueeze(-1), v_after], -1)
            h_after = torch.cat([self.act.fn(pre_i).unsqueeze(-1), h_after], -1)
        z = vecmat(v_after, p.q.transpose(-1, -2)) + outside
        pre_t = torch.stack(pre, -1)
        logdet = torch.log1p(self.act.derivative(pre_t) * self._diag_product(p)).sum(-1)
        return z, -logdet

    def invertibility(self) -> Invertibility:
        product = self._diag_product(self.constrained()).detach()
        margin = float(torch.clamp(1 + product * self.act.sup_derivative, max=1.0).min())
        condition = f"1 + R_ii·R̃_ii·sup h' > 0 for all i (sup h' = {self.act.sup_derivative:g})"
        return Invertibility(margin > 0, margin, condition)

    def extra_repr(self) -> str:
        flip = ", flip=True" if self.flip else ""
        return f"dim={self.dim}, hidden={self.hidden}, kind={self.kind!r}, activation={self.act.name!r}{flip}"


class GeneralSylvester(FlowLayer):
    r"""Unconstrained residual layer :math:`x = z + A\, h(B^\top z + b)`, ``A, B ∈ R^{d×m}``.

    This is the layer of Kong & Chaudhuri's theory (``m`` neurons). Log-det by Sylvester's
    determinant identity: :math:`\log|\det(I_m + \mathrm{diag}(h'(B^\top z + b))\, B^\top A)|`.

    Invertibility is *not* enforced. The layer is certified invertible when
    ``‖BᵀA‖₂ · sup h' < 1``: then ``t = Bᵀz + b`` is the unique solution of
    ``t + BᵀA h(t) = Bᵀx + b`` (a contraction perturbation of the identity), solved by Newton
    steps safeguarded with fixed-point steps, and ``z = x − A h(t)``. Otherwise ``inverse``
    raises :class:`InverseNotAvailable`.

    Args:
        dim: Dimension ``d``.
        hidden: Number of neurons ``m``.
        activation: Any activation of :mod:`flowprobe.activations`.

    References:
        Z. Kong, K. Chaudhuri. The Expressive Power of a Class of Normalizing Flow Models.
        AISTATS 2020. https://arxiv.org/abs/2006.00392
    """

    max_iterations = 200

    def __init__(self, dim: int, hidden: int = 1, activation: str | Activation = "tanh") -> None:
        super().__init__(dim)
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.hidden = hidden
        self.act = get_activation(activation)
        self.A = normal_init((dim, hidden), 0.5 / (dim * hidden) ** 0.5)
        self.B = normal_init((dim, hidden), 1.0 / dim**0.5)
        self.b = nn.Parameter(torch.zeros(hidden))

    def constrain(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        return raw

    def _log_abs_det(self, pre: Tensor, coupling: Tensor) -> Tensor:
        eye = torch.eye(self.hidden, dtype=pre.dtype, device=pre.device)
        return torch.linalg.slogdet(eye + self.act.derivative(pre).unsqueeze(-1) * coupling).logabsdet

    def transform(self, z: Tensor, p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        pre = vecmat(z, p["B"]) + p["b"]
        x = z + vecmat(self.act.fn(pre), p["A"].transpose(-1, -2))
        return x, self._log_abs_det(pre, p["B"].transpose(-1, -2) @ p["A"])

    def lipschitz_bound(self, p: dict[str, Tensor] | None = None) -> Tensor:
        """``‖BᵀA‖₂ · sup h'`` (per parameter batch); the layer is certified invertible if < 1."""
        p = self.constrained() if p is None else p
        coupling = p["B"].transpose(-1, -2) @ p["A"]
        return torch.linalg.matrix_norm(coupling, ord=2) * self.act.sup_derivative

    def invert(self, x: Tensor, p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        bound = self.lipschitz_bound(p).detach()
        if bool((bound >= 1).any()):
            raise InverseNotAvailable(
                f"GeneralSylvester is not certified invertible: ‖BᵀA‖₂·sup h' = {float(bound.max()):.4g} >= 1; "
                "use Sylvester (constrained) layers for guaranteed inverses"
            )
        coupling = p["B"].transpose(-1, -2) @ p["A"]  # K = BᵀA
        target = vecmat(x, p["B"]) + p["b"]
        eye = torch.eye(self.hidden, dtype=x.dtype, device=x.device)

        def residual(t: Tensor, k: Tensor, s: Tensor) -> Tensor:  # F(t) = t + K h(t) − s
            return t + vecmat(self.act.fn(t), k.transpose(-1, -2)) - s

        with torch.no_grad():
            k, s = coupling.detach(), target.detach()
            t = s.clone()
            res = residual(t, k, s)
            tol = 8 * torch.finfo(x.dtype).eps * (1 + s.norm(dim=-1))
            for _ in range(self.max_iterations):  # Newton, or the contraction step where it does better
                jac = eye + k * self.act.derivative(t).unsqueeze(-2)
                newton = t - torch.linalg.solve(jac, res.unsqueeze(-1)).squeeze(-1)
                fixed = t - res
                res_newton, res_fixed = residual(newton, k, s), residual(fixed, k, s)
                take_newton = (res_newton.norm(dim=-1) <= res_fixed.norm(dim=-1)).unsqueeze(-1)
                t = torch.where(take_newton, newton, fixed)
                res = torch.where(take_newton, res_newton, res_fixed)
                if not bool((res.norm(dim=-1) > tol).any()):
                    break
        if torch.is_grad_enabled():  # one implicit-function step (value unchanged, exact gradients)
            jac = (eye + coupling * self.act.derivative(t).unsqueeze(-2)).detach()
            t = t - torch.linalg.solve(jac, residual(t, coupling, target).unsqueeze(-1)).squeeze(-1)
        z = x - vecmat(self.act.fn(t), p["A"].transpose(-1, -2))
        return z, -self._log_abs_det(t, coupling)

    def invertibility(self) -> Invertibility:
        bound = float(self.lipschitz_bound().detach().max())
        return Invertibility(bound < 1, 1 - bound, "‖BᵀA‖₂·sup h' < 1 (sufficient; contraction)")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, activation={self.act.name!r}"
