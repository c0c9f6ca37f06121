"""Source and target densities with ``log_prob`` and ``sample``.

All are ``nn.Module``s so that ``.to(device, dtype)`` moves them; samples are drawn on the
module's device and dtype with torch's global RNG (seed it with ``torch.manual_seed``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from flowprobe.userfile import load_user_object
from flowprobe.validation import check_points

__all__ = [
    "Confined",
    "DiagonalNormal",
    "Density",
    "Energy",
    "FullNormal",
    "FunctionEnergy",
    "GaussianMixture",
    "RezendeEnergy",
    "StandardNormal",
    "load_energy",
    "log_scale_bound",
    "rezende_energy",
]

LOG_2PI = math.log(2 * math.pi)


class Density(nn.Module):
    """A density on ``R^dim`` with ``log_prob``, ``sample`` and ``rsample``.

    An *ensemble* density (``ensemble_shape = E``, parameters leading with ``E``) is ``E`` independent
    densities evaluated in the same ops, as a flow's ensemble members: points ``(*E, N, dim)`` (or
    ``(N, dim)``, seen by every member), log-densities ``(*E, N)`` and samples ``(*E, n, dim)``.
    """

    def __init__(self, dim: int, dtype: torch.dtype | None = None, ensemble_shape: tuple[int, ...] = ()) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self.ensemble_shape = tuple(ensemble_shape)
        self.register_buffer("_anchor", torch.zeros((), dtype=dtype), persistent=False)

    @property
    def anchor(self) -> Tensor:
        """A scalar carrying this module's device and dtype."""
        return self._anchor

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density of points ``(N, dim)`` (or ``(*E, N, dim)``), shape ``(N,)`` (or ``(*E, N)``)."""
        return self._log_prob(check_points(x, self.dim, "x", self.ensemble_shape))

    def _log_prob(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def rsample(self, n: int) -> Tensor:
        """``n`` reparametrised samples (differentiable in the parameters), shape ``(*E, n, dim)``."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"number of samples must be a positive integer, got {n!r}")
        return self._rsample(n)

    def _rsample(self, n: int) -> Tensor:
        return self.reparametrise(self._noise(n))

    def reparametrise(self, eps: Tensor) -> Tensor:
        """Samples ``x = T(ε)`` from standard normal noise ``ε`` of shape ``(..., dim)``: the map
        :meth:`rsample` applies to its own noise (training draws ``ε`` from its own generators).

        Raises:
            ValueError: the density has no such map (e.g. a mixture, which picks a component).
        """
        raise ValueError(f"{type(self).__name__} is not a transform of standard normal noise (not reparametrisable)")

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` samples without gradient, shape ``(*E, n, dim)``."""
        return self.rsample(n)

    def _noise(self, n: int) -> Tensor:
        a = self.anchor
        return torch.randn(*self.ensemble_shape, n, self.dim, dtype=a.dtype, device=a.device)

    def member(self, index: int | tuple[int, ...]) -> Density:
        """Ensemble member ``index`` as a stand-alone density (a copy).

        Raises:
            ValueError: the density is not an ensemble.
        """
        if not self.ensemble_shape:
            raise ValueError("this density is not an ensemble")
        index = (index,) if isinstance(index, int) else tuple(index)
        solo = copy.deepcopy(self)
        for name, p in list(solo.named_parameters(recurse=False)):
            solo.register_parameter(name, nn.Parameter(p.detach()[index].clone(), p.requires_grad))
        for name, b in list(solo.named_buffers(recurse=False)):
            if name != "_anchor":
                solo.register_buffer(name, b[index].clone(), persistent=name not in solo._non_persistent_buffers_set)
        solo.ensemble_shape = ()
        return solo


class StandardNormal(Density):
    """``N(0, I_dim)``."""

    def _log_prob(self, x: Tensor) -> Tensor:
        return -0.5 * _squared_norm(x) - 0.5 * self.dim * LOG_2PI

    def reparametrise(self, eps: Tensor) -> Tensor:
        return eps

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def log_scale_bound(dtype: torch.dtype) -> float:
    """``B = 0.45 log(max)`` of a floating-point type: for ``|log σ| ≤ B``, ``σ^±1`` and ``σ^±2`` are finite,
    normal numbers (float32: ``σ ∈ [2e-18, 5e17]``; float64: ``[5e-139, 2e138]``)."""
    return 0.45 * math.log(torch.finfo(dtype).max)


class _Normal(Density):
    r"""A Gaussian ``x = μ + L ε``, ``ε ~ N(0, I)``, with ``L`` lower triangular and
    ``diag(L) = exp(clamp(s, −B, B))`` for raw log-scales ``s`` (:func:`log_scale_bound`): for every raw
    value the diagonal is positive and ``Σ = L Lᵀ`` positive definite.

    :math:`\log q(x) = -\tfrac12\|L^{-1}(x - μ)\|^2 - \sum_i s_i - \tfrac d2 \log 2π` (clamped ``s``).
    Subclasses give the off-diagonal part (:meth:`scale_tril`) and the whitening ``L⁻¹(x − μ)``.
    """

    def __init__(self, loc: Tensor, log_scale: Tensor, trainable: bool, **raw: Tensor) -> None:
        super().__init__(loc.shape[-1], loc.dtype, tuple(loc.shape[:-1]))
        for name, value in {"loc": loc, "log_scale": log_scale, **raw}.items():
            if trainable and value.numel():
                self.register_parameter(name, nn.Parameter(value))
            else:  # an empty raw tensor (nothing below the diagonal in 1-D) is neither trained nor saved
                self.register_buffer(name, value, persistent=bool(value.numel()))
        self.trainable = trainable

    def clamped_log_scale(self) -> Tensor:
        """The log-scales ``s`` clamped to ``[−B, B]``, shape ``(*E, dim)``: ``log diag(L)``."""
        bound = log_scale_bound(self.log_scale.dtype)
        return self.log_scale.clamp(-bound, bound)

    def scale_tril(self) -> Tensor:
        """``L``, shape ``(*E, dim, dim)``."""
        raise NotImplementedError

    def covariance(self) -> Tensor:
        """``Σ = L Lᵀ``, shape ``(*E, dim, dim)``."""
        tril = self.scale_tril()
        return tril @ tril.mT

    def _whiten(self, diff: Tensor) -> Tensor:
        raise NotImplementedError

    def _log_prob(self, x: Tensor) -> Tensor:
        eps = self._whiten(x - self.loc.unsqueeze(-2))
        log_det = self.clamped_log_scale().sum(-1, keepdim=True)
        return -0.5 * _squared_norm(eps) - log_det - 0.5 * self.dim * LOG_2PI

    def set_moments(self, mean: Tensor, cov: Tensor) -> None:
        """Set the parameters to mean ``(*E, dim)`` and covariance ``(*E, dim, dim)`` (positive definite;
        a diagonal source takes its diagonal, the maximum-likelihood diagonal Gaussian of the same data)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        ensemble = f", ensemble={self.ensemble_shape}" if self.ensemble_shape else ""
        return f"dim={self.dim}, trainable={self.trainable}{ensemble}"


def _as_float(value: Tensor, like: Tensor | None = None) -> Tensor:
    value = torch.as_tensor(value)
    if like is not None:
        return value.to(like.dtype)
    return value if value.is_floating_point() else value.to(torch.get_default_dtype())


class DiagonalNormal(_Normal):
    """``N(loc, diag(scale²))``; ``trainable=True`` makes ``loc`` and ``log scale`` parameters.

    ``loc`` of shape ``(*E, dim)`` makes an ensemble of ``E`` such densities.

    Args:
        loc: Mean, shape ``(dim,)`` (or ``(*E, dim)``).
        scale: Standard deviations, the shape of ``loc``, all positive.
        trainable: Learn ``loc`` and ``scale``.
    """

    def __init__(self, loc: Tensor, scale: Tensor, trainable: bool = False) -> None:
        loc = _as_float(loc)
        scale = _as_float(scale, loc)
        if loc.dim() < 1 or loc.shape[-1] < 1 or scale.shape != loc.shape:
            shapes = f"{tuple(loc.shape)} and {tuple(scale.shape)}"
            raise ValueError(f"loc and scale must have one shape (*E, dim), got {shapes}")
        if not bool((scale > 0).all()):
            raise ValueError("scale must be positive")
        super().__init__(loc, scale.log(), trainable)

    def scale_tril(self) -> Tensor:
        return torch.diag_embed(self.clamped_log_scale().exp())

    def _whiten(self, diff: Tensor) -> Tensor:
        return diff * torch.exp(-self.clamped_log_scale()).unsqueeze(-2)

    def reparametrise(self, eps: Tensor) -> Tensor:
        return self.loc.unsqueeze(-2) + eps * self.clamped_log_scale().exp().unsqueeze(-2)

    @torch.no_grad()
    def set_moments(self, mean: Tensor, cov: Tensor) -> None:
        self.loc.copy_(mean)
        self.log_scale.copy_(0.5 * torch.diagonal(cov, dim1=-2, dim2=-1).log())


class FullNormal(_Normal):
    r"""``N(loc, L Lᵀ)`` with a full covariance through its Cholesky factor ``L``.

    Raw parameters: ``loc``, the log-diagonal ``log_scale`` (clamped, see :class:`_Normal`) and
    ``lower``, the ``dim(dim − 1)/2`` entries strictly below the diagonal (row by row). Any raw value
    gives a lower-triangular ``L`` with a positive diagonal, hence a positive definite covariance.
    ``loc`` of shape ``(*E, dim)`` makes an ensemble of ``E`` such densities.

    Args:
        loc: Mean, shape ``(dim,)`` (or ``(*E, dim)``).
        scale_tril: ``L``, shape ``(dim, dim)`` (or ``(*E, dim, dim)``): lower triangular, positive diagonal.
        trainable: Learn ``loc`` and ``L``.
    """

    def __init__(self, loc: Tensor, scale_tril: Tensor, trainable: bool = False) -> None:
        loc = _as_float(loc)
        tril = _as_float(scale_tril, loc)
        if loc.dim() < 1 or loc.shape[-1] < 1 or tril.shape != (*loc.shape, loc.shape[-1]):
            shapes = f"{tuple(loc.shape)} and {tuple(tril.shape)}"
            raise ValueError(f"loc and scale_tril must have shapes (*E, dim) and (*E, dim, dim), got {shapes}")
        diag = torch.diagonal(tril, dim1=-2, dim2=-1)
        if not bool((diag > 0).all()) or bool((tril.triu(1) != 0).any()):
            raise ValueError("scale_tril must be lower triangular with a positive diagonal")
        rows, cols = self._below(loc.shape[-1], loc.device)
        super().__init__(loc, diag.log(), trainable, lower=tril[..., rows, cols])

    @staticmethod
    def _below(dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Row and column indices of the entries strictly below the diagonal, row by row."""
        rows, cols = torch.tril_indices(dim, dim, -1, device=device)
        return rows, cols

    def scale_tril(self) -> Tensor:
        d = self.dim
        rows, cols = self._below(d, self.lower.device)
        flat = self.lower.new_zeros(*self.lower.shape[:-1], d * d).index_copy(-1, rows * d + cols, self.lower)
        return flat.reshape(*flat.shape[:-1], d, d) + torch.diag_embed(self.clamped_log_scale().exp())

    def _whiten(self, diff: Tensor) -> Tensor:
        return torch.linalg.solve_triangular(self.scale_tril(), diff.mT, upper=False).mT

    def reparametrise(self, eps: Tensor) -> Tensor:
        return self.loc.unsqueeze(-2) + eps @ self.scale_tril().mT

    @torch.no_grad()
    def set_moments(self, mean: Tensor, cov: Tensor) -> None:
        tril = torch.linalg.cholesky(cov)
        rows, cols = self._below(self.dim, tril.device)
        self.loc.copy_(mean)
        self.log_scale.copy_(torch.diagonal(tril, dim1=-2, dim2=-1).log())
        self.lower.copy_(tril[..., rows, cols])


class GaussianMixture(Density):
    """Mixture ``Σ_k w_k N(μ_k, Σ_k)``.

    Args:
        means: ``(K, dim)``.
        covariances: ``(K,)`` isotropic variances, ``(K, dim)`` diagonal variances or
            ``(K, dim, dim)`` full covariance matrices (positive definite).
        weights: ``(K,)`` non-negative, normalised internally; default uniform.
    """

    def __init__(self, means: Tensor, covariances: Tensor, weights: Tensor | None = None) -> None:
        means = torch.as_tensor(means)
        dtype = means.dtype if means.is_floating_point() else torch.get_default_dtype()
        means = means.to(dtype)
        if means.dim() != 2:
            raise ValueError(f"means must have shape (K, dim), got {tuple(means.shape)}")
        k, dim = means.shape
        super().__init__(dim, dtype)
        cov = torch.as_tensor(covariances, dtype=dtype)
        if cov.shape == (k,):
            cov = torch.diag_embed(cov.unsqueeze(-1).expand(k, dim))
        elif cov.shape == (k, dim):
            cov = torch.diag_embed(cov)
        elif cov.shape != (k, dim, dim):
            expected = f"({k},), ({k}, {dim}) or ({k}, {dim}, {dim})"
            raise ValueError(f"covariances must have shape {expected}, got {tuple(cov.shape)}")
        chol, info = torch.linalg.cholesky_ex(cov)
        if bool((info != 0).any()):
            raise ValueError("every covariance matrix must be symmetric positive definite")
        w = torch.full((k,), 1.0 / k, dtype=dtype) if weights is None else torch.as_tensor(weights, dtype=dtype)
        if w.shape != (k,) or bool((w < 0).any()) or not float(w.sum()) > 0:
            raise ValueError(f"weights must be {k} non-negative numbers with a positive sum")
        self.register_buffer("means", means)
        self.register_buffer("scale_tril", chol)
        self.register_buffer("log_weights", torch.log(w / w.sum()))

    def component_log_prob(self, x: Tensor) -> Tensor:
        """``log N(x; μ_k, Σ_k)`` for every component, shape ``(N, K)``."""
        diff = (x.unsqueeze(1) - self.means).unsqueeze(-1)  # (N, K, d, 1)
        std = torch.linalg.solve_triangular(self.scale_tril, diff, upper=False).squeeze(-1)
        half_log_det = torch.diagonal(self.scale_tril, dim1=-2, dim2=-1).log().sum(-1)
        return -0.5 * _squared_norm(std) - half_log_det - 0.5 * self.dim * LOG_2PI

    def _log_prob(self, x: Tensor) -> Tensor:
        return torch.logsumexp(self.component_log_prob(x) + self.log_weights, dim=-1)

    def _rsample(self, n: int) -> Tensor:
        idx = torch.multinomial(self.log_weights.exp(), n, replacement=True)
        noise = self._noise(n).unsqueeze(-1)
        return self.means[idx] + (self.scale_tril[idx] @ noise).squeeze(-1)


# -- unnormalised targets p(z) ∝ exp(−U(z)) for reverse-KL training --------------------------------


class Energy(nn.Module):
    """An energy ``U`` on ``R^dim``: the unnormalised target density is ``exp(−U(z))``.

    Args:
        dim: Dimension of the points.
        name: Short name used in figures and reports.
    """

    def __init__(self, dim: int, name: str = "energy") -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim, self.name = dim, name

    def forward(self, z: Tensor) -> Tensor:
        """``U(z)`` for points ``(N, dim)``, shape ``(N,)``."""
        return self.energy(check_points(z, self.dim, "z"))

    def energy(self, z: Tensor) -> Tensor:
        """``U(z)`` without input validation."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dim={self.dim}, name={self.name!r}"


def _squared_norm(x: Tensor) -> Tensor:
    """``‖x‖²`` over the last axis, as a product with a vector of ones: a sum over a short last axis
    (d = 2) is a slow reduction, a few times the cost of the product at thousands of points."""
    return (x * x) @ x.new_ones(x.shape[-1])


def _gauss_log(t: Tensor, scale: float) -> Tensor:
    return -0.5 * (t / scale) ** 2


def _radius(z1: Tensor, z2: Tensor) -> Tensor:
    """``‖(z1, z2)‖`` elementwise (a reduction over a last axis of 2, or ``hypot``, costs several times more)
    as ``√(z1² + z2² + τ)``, ``τ`` the smallest normal number: the gradient ``z/r`` is 0 at the origin, as
    ``Tensor.norm`` has it; ``τ`` changes ``r`` by less than ``τ/2r`` (nothing for ``|z|`` above ``√τ``)."""
    return (z1 * z1 + z2 * z2 + torch.finfo(z1.dtype).tiny).sqrt()


def _two_modes(z1: Tensor) -> Tensor:
    """U1's second term ``−ln(exp(−½((z1 − 2)/0.6)²) + exp(−½((z1 + 2)/0.6)²))``, its squares expanded:
    ``(z1² + 4)/0.72 − ln(eᵃ + e⁻ᵃ)`` with ``a = z1/0.18``: half the passes over the points. Rounding: a few
    ulps of the larger term (≈ 11 at the modes z1 = ±2, where the two cancel), in absolute terms."""
    a = z1 / 0.18
    return (z1 * z1 + 4) / 0.72 - torch.logaddexp(a, -a)


class RezendeEnergy(Energy):
    r"""The 2-D test energies U1–U4 of Rezende & Mohamed (2015, Table 1), as written there.

    With :math:`w_1 = \sin(2\pi z_1/4)`, :math:`w_2 = 3\exp(-\tfrac12((z_1-1)/0.6)^2)`,
    :math:`w_3 = 3\sigma((z_1-1)/0.3)`:

    * U1 = ½((‖z‖ − 2)/0.4)² − ln(exp(−½((z1 − 2)/0.6)²) + exp(−½((z1 + 2)/0.6)²))
    * U2 = ½((z2 − w1)/0.4)²
    * U3 = −ln(exp(−½((z2 − w1)/0.35)²) + exp(−½((z2 − w1 + w2)/0.35)²))
    * U4 = −ln(exp(−½((z2 − w1)/0.4)²) + exp(−½((z2 − w1 + w3)/0.35)²))

    U1 is normalisable. **U2–U4 are not**: nothing confines ``z1``, so ``∫exp(−U) = ∞`` and the
    reverse-KL loss is unbounded below. Use :func:`rezende_energy` (which wraps them in
    :class:`Confined`) for anything that needs a proper density. Log-sum-exps are evaluated
    stably (no ``+1e-6`` inside the logs).

    Args:
        index: 1, 2, 3 or 4.

    References:
        D. J. Rezende, S. Mohamed. Variational Inference with Normalizing Flows. ICML 2015.
    """

    def __init__(self, index: int) -> None:
        if index not in (1, 2, 3, 4):
            raise ValueError(f"Rezende–Mohamed energies are U1..U4, got index {index!r}")
        super().__init__(2, f"U{index}")
        self.index = index

    def energy(self, z: Tensor) -> Tensor:
        z1, z2 = z[:, 0], z[:, 1]
        if self.index == 1:
            return 0.5 * ((_radius(z1, z2) - 2) / 0.4) ** 2 + _two_modes(z1)
        w1 = torch.sin(2 * math.pi * z1 / 4)
        if self.index == 2:
            return 0.5 * ((z2 - w1) / 0.4) ** 2
        if self.index == 3:
            w2 = 3 * torch.exp(_gauss_log(z1 - 1, 0.6))
            return -torch.logaddexp(_gauss_log(z2 - w1, 0.35), _gauss_log(z2 - w1 + w2, 0.35))
        w3 = 3 * torch.sigmoid((z1 - 1) / 0.3)
        return -torch.logaddexp(_gauss_log(z2 - w1, 0.4), _gauss_log(z2 - w1 + w3, 0.35))


class Confined(Energy):
    r"""An energy plus a smooth quadratic wall on one coordinate:
    :math:`U(z) + \tfrac12\,(\max(|z_c| - a, 0)/s)^2`.

    Inside ``[−a, a]`` nothing changes; outside, the density decays like a Gaussian of width
    ``s``. The wall is continuously differentiable. It makes U2–U4 of Rezende & Mohamed
    normalisable (they only confine ``z2``): with the defaults ``c = 0`` (``z1``), ``a = 4``,
    ``s = 0.2`` the target is the paper's picture on ``(−4, 4)²`` with tails that vanish within
    about one unit outside it.

    Args:
        base: The energy to confine.
        coordinate: Index ``c`` of the confined coordinate.
        bound: Half-width ``a`` of the free interval.
        width: Length scale ``s`` of the wall.
    """

    def __init__(self, base: Energy, coordinate: int = 0, bound: float = 4.0, width: float = 0.2) -> None:
        if not 0 <= coordinate < base.dim:
            raise ValueError(f"coordinate must lie in [0, {base.dim}), got {coordinate}")
        if not (bound > 0 and width > 0):
            raise ValueError(f"bound and width must be positive, got {bound}, {width}")
        super().__init__(base.dim, f"{base.name} (confined |z{coordinate + 1}|≤{bound:g})")
        self.base, self.coordinate, self.bound, self.width = base, coordinate, float(bound), float(width)

    def energy(self, z: Tensor) -> Tensor:
        excess = torch.relu(z[:, self.coordinate].abs() - self.bound) / self.width
        return self.base.energy(z) + 0.5 * excess * excess


class FunctionEnergy(Energy):
    """A user's function ``U(z)`` (tensor ``(N, dim)`` in, tensor ``(N,)`` out) as an :class:`Energy`.

    Every call is checked: a failure of the function or an output of another shape is a one-line
    ``ValueError`` naming the batch shape (a function may work at ``N = 3`` and not at ``N = 1024``).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], dim: int, name: str = "energy") -> None:
        super().__init__(dim, name)
        self.fn = fn

    def energy(self, z: Tensor) -> Tensor:
        try:
            out = self.fn(z)
        except Exception as err:  # the user's function failed: one line, no traceback
            raise ValueError(f"energy {self.name} failed on a batch of shape {tuple(z.shape)}: "
                             f"{type(err).__name__}: {err}") from None
        if not isinstance(out, Tensor) or out.shape != (z.shape[0],):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"energy {self.name} must return a tensor of shape (N,), got {shape} for N={z.shape[0]}")
        return out


def rezende_energy(name: str) -> Energy:
    """``"U1"``–``"U4"`` (case-insensitive) as *proper* targets: U1 as written, U2–U4 wrapped in
    :class:`Confined` (smooth wall outside ``|z1| ≤ 4``). Append ``-raw`` (``"U2-raw"``) for the
    paper's improper formula."""
    key = name.strip().lower()
    raw = key.endswith("-raw")
    key = key.removesuffix("-raw")
    if key not in ("u1", "u2", "u3", "u4"):
        raise ValueError(f"unknown energy {name!r}; expected U1, U2, U3 or U4 (or a file.py:function)")
    energy = RezendeEnergy(int(key[1]))
    return energy if raw or key == "u1" else Confined(energy)


def load_energy(spec: str, dim: int = 2) -> Energy:
    """An energy from a name (``U1``–``U4``, see :func:`rezende_energy`) or ``path/to/file.py:function``.

    The file is imported on purpose: it is the user's own code. Its function must map a tensor
    ``(N, dim)`` to a tensor ``(N,)`` of energies; this is checked on a small probe batch.

    Raises:
        ValueError / FileNotFoundError: unknown name, missing file or function, wrong output shape.
    """
    if ":" not in spec or not spec.rsplit(":", 1)[0].endswith(".py"):
        return rezende_energy(spec)
    fn = load_user_object(spec)
    path, function = Path(spec.rsplit(":", 1)[0]), spec.rsplit(":", 1)[1]
    if not callable(fn):
        raise ValueError(f"energy {spec!r} is not a function")
    energy = FunctionEnergy(fn, dim, f"{path.name}:{function}")
    energy.energy(torch.zeros(3, dim))  # fails now rather than during training
    return energy
