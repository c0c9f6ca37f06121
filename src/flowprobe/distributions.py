"""Source and target densities with ``log_prob`` and ``sample``.

All are ``nn.Module``s so that ``.to(device, dtype)`` moves them; samples are drawn on the
module's device and dtype with torch's global RNG (seed it with ``torch.manual_seed``).
"""

from __future__ import annotations

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
    "FunctionEnergy",
    "GaussianMixture",
    "RezendeEnergy",
    "StandardNormal",
    "load_energy",
    "rezende_energy",
]

LOG_2PI = math.log(2 * math.pi)


class Density(nn.Module):
    """A density on ``R^dim`` with ``log_prob``, ``sample`` and ``rsample``."""

    def __init__(self, dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self.register_buffer("_anchor", torch.zeros((), dtype=dtype), persistent=False)

    @property
    def anchor(self) -> Tensor:
        """A scalar carrying this module's device and dtype."""
        return self._anchor

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density of points ``(N, dim)``, shape ``(N,)``."""
        return self._log_prob(check_points(x, self.dim, "x"))

    def _log_prob(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def rsample(self, n: int) -> Tensor:
        """``n`` reparametrised samples (differentiable in the parameters), shape ``(n, dim)``."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"number of samples must be a positive integer, got {n!r}")
        return self._rsample(n)

    def _rsample(self, n: int) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` samples without gradient, shape ``(n, dim)``."""
        return self.rsample(n)

    def _noise(self, n: int) -> Tensor:
        a = self.anchor
        return torch.randn(n, self.dim, dtype=a.dtype, device=a.device)


class StandardNormal(Density):
    """``N(0, I_dim)``."""

    def _log_prob(self, x: Tensor) -> Tensor:
        return -0.5 * (x * x).sum(-1) - 0.5 * self.dim * LOG_2PI

    def _rsample(self, n: int) -> Tensor:
        return self._noise(n)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class DiagonalNormal(Density):
    """``N(loc, diag(scale²))``; ``trainable=True`` makes ``loc`` and ``log scale`` parameters.

    Args:
        loc: Mean, shape ``(dim,)``.
        scale: Standard deviations, shape ``(dim,)``, all positive.
        trainable: Learn ``loc`` and ``scale``.
    """

    def __init__(self, loc: Tensor, scale: Tensor, trainable: bool = False) -> None:
        loc, scale = torch.as_tensor(loc), torch.as_tensor(scale)
        dtype = loc.dtype if loc.is_floating_point() else torch.get_default_dtype()
        super().__init__(loc.numel(), dtype)
        if loc.dim() != 1 or scale.shape != loc.shape:
            shapes = f"{tuple(loc.shape)} and {tuple(scale.shape)}"
            raise ValueError(f"loc and scale must be vectors of one shape, got {shapes}")
        if not bool((scale > 0).all()):
            raise ValueError("scale must be positive")
        loc, log_scale = loc.to(dtype), scale.to(dtype).log()
        if trainable:
            self.loc, self.log_scale = nn.Parameter(loc), nn.Parameter(log_scale)
        else:
            self.register_buffer("loc", loc)
            self.register_buffer("log_scale", log_scale)

    def _log_prob(self, x: Tensor) -> Tensor:
        std = (x - self.loc) * torch.exp(-self.log_scale)
        return -0.5 * (std * std).sum(-1) - self.log_scale.sum() - 0.5 * self.dim * LOG_2PI

    def _rsample(self, n: int) -> Tensor:
        return self.loc + self._noise(n) * torch.exp(self.log_scale)


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
        return -0.5 * (std * std).sum(-1) - half_log_det - 0.5 * self.dim * LOG_2PI

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


def _gauss_log(t: Tensor, scale: float) -> Tensor:
    return -0.5 * (t / scale) ** 2


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
            ring = 0.5 * ((z.norm(dim=-1) - 2) / 0.4) ** 2
            return ring - torch.logaddexp(_gauss_log(z1 - 2, 0.6), _gauss_log(z1 + 2, 0.6))
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
