"""Source and target densities with ``log_prob`` and ``sample``.

All are ``nn.Module``s so that ``.to(device, dtype)`` moves them; samples are drawn on the
module's device and dtype with torch's global RNG (seed it with ``torch.manual_seed``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowprobe.validation import check_points

__all__ = ["DiagonalNormal", "Density", "GaussianMixture", "StandardNormal"]

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
