"""The mechanism every flowprobe layer shares.

Direction convention (stated once, used everywhere): layers map **source → data**::

    x, logdet = layer(z)            # logdet = log|det ∂x/∂z| at z, shape (N,)
    z, logdet_inv = layer.inverse(x)  # logdet_inv = log|det ∂z/∂x| at x = −logdet at z

A layer owns *raw* (unconstrained) parameters. ``constrain`` maps raw values to the parameters of
the formula, enforcing invertibility for **any** raw value; ``transform`` and ``invert`` are pure
functions of a point batch and constrained parameters. The raw parameters may be the layer's own
``nn.Parameter``s or a batch produced by a network (amortised / conditional flows): pass
``params={name: tensor of shape (N, *shape)}`` and the very same code path runs with one set of
parameters per data point. ``unflatten`` splits a network's flat output into that mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowprobe.validation import check_points, validation_enabled

__all__ = ["FlowLayer", "InverseNotAvailable", "Invertibility", "RawParams"]

RawParams = Mapping[str, Tensor]


class InverseNotAvailable(NotImplementedError):  # noqa: N818 (nflows' name)
    """Raised when a layer cannot be inverted with its current parameters."""


@dataclass(frozen=True)
class Invertibility:
    """Report of a layer's invertibility condition at its current parameters.

    Attributes:
        invertible: Whether the sufficient condition holds.
        margin: The smallest value of the quantity that must stay positive (e.g. the minimum
            slope ``1 + wᵀû·sup h'`` of a planar layer); ``invertible`` iff ``margin > 0``.
        condition: The condition in words.
    """

    invertible: bool
    margin: float
    condition: str


class FlowLayer(nn.Module):
    """Base class of invertible layers ``x = f(z)`` on ``R^dim``.

    Subclasses register their raw parameters as ``nn.Parameter``s (shapes without batch
    dimension) and implement ``constrain``, ``transform`` and ``invert``.

    Args:
        dim: Dimension of the points.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = dim

    # -- parameters ------------------------------------------------------------------------
    def raw_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and (unbatched) shapes of the raw parameters."""
        return {name: tuple(p.shape) for name, p in self.own_raw().items()}

    @property
    def raw_numel(self) -> int:
        """Number of raw parameter values; the width a network must output to amortise this layer."""
        return sum(p.numel() for p in self.own_raw().values())

    def own_raw(self) -> dict[str, Tensor]:
        """The layer's own raw parameters: its ``nn.Parameter``s or, once a :class:`~flowprobe.Flow`
        has fused it into a run of same-family layers, views of the run's stacked parameters
        (:mod:`flowprobe.layers.fused`)."""
        slot = self.__dict__.get("_fused_slot")
        if slot is None:
            return dict(self.named_parameters(recurse=False))
        stack, index = slot
        return {name: p[index] for name, p in stack.named_parameters(recurse=False)}

    def __getattr__(self, name: str) -> Any:
        slot = self.__dict__.get("_fused_slot")
        if slot is not None and name in slot[0]._parameters:  # a fused layer reads a view: layer.u is stack.u[i]
            return slot[0]._parameters[name][slot[1]]
        return super().__getattr__(name)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a ``(N, raw_numel)`` tensor (e.g. a network head) into batched raw parameters."""
        if flat.dim() != 2 or flat.shape[1] != self.raw_numel:
            raise ValueError(f"flat parameters must have shape (N, {self.raw_numel}), got {tuple(flat.shape)}")
        out, start = {}, 0
        for name, shape in self.raw_shapes().items():
            size = int(torch.Size(shape).numel())
            out[name] = flat[:, start : start + size].reshape(flat.shape[0], *shape)
            start += size
        return out

    def _raw(self, params: RawParams | None, batch: int) -> dict[str, Tensor]:
        if params is None:
            return self.own_raw()
        if validation_enabled():
            shapes = self.raw_shapes()
            if set(params) != set(shapes):
                raise ValueError(f"params must have keys {sorted(shapes)}, got {sorted(params)}")
            for name, shape in shapes.items():
                if tuple(params[name].shape) != (batch, *shape):
                    raise ValueError(
                        f"params[{name!r}] must have shape {(batch, *shape)}, got {tuple(params[name].shape)}"
                    )
        return dict(params)

    def constrained(self, params: RawParams | None = None, batch: int = 1) -> Any:
        """The constrained parameters of the formula (own or given raw parameters)."""
        return self.constrain(self._raw(params, batch))

    def constrain(self, raw: dict[str, Tensor]) -> Any:
        """Map raw parameters (optionally with a leading batch dimension) to constrained ones."""
        raise NotImplementedError

    def transform(self, z: Tensor, p: Any) -> tuple[Tensor, Tensor]:
        """``x, log|det ∂x/∂z|`` for constrained parameters ``p`` (no validation)."""
        raise NotImplementedError

    def invert(self, x: Tensor, p: Any) -> tuple[Tensor, Tensor]:
        """``z, log|det ∂z/∂x|`` for constrained parameters ``p`` (no validation)."""
        raise NotImplementedError

    def invertibility(self) -> Invertibility:
        """Whether the current parameters satisfy the layer's invertibility condition."""
        raise NotImplementedError

    # -- public API ------------------------------------------------------------------------
    def forward(self, z: Tensor, params: RawParams | None = None) -> tuple[Tensor, Tensor]:
        """Map source points to data points.

        Args:
            z: Points of shape ``(N, dim)``.
            params: Optional batched raw parameters ``{name: (N, *shape)}``; defaults to the
                layer's own parameters.

        Returns:
            ``(x, logdet)`` with shapes ``(N, dim)`` and ``(N,)``.
        """
        z = check_points(z, self.dim, "z")
        return self.transform(z, self.constrained(params, z.shape[0]))

    def inverse(self, x: Tensor, params: RawParams | None = None) -> tuple[Tensor, Tensor]:
        """Map data points back to source points.

        Returns:
            ``(z, logdet_inv)`` where ``logdet_inv = log|det ∂z/∂x|`` (minus the forward log-det).
        """
        x = check_points(x, self.dim, "x")
        return self.invert(x, self.constrained(params, x.shape[0]))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def inner(a: Tensor, b: Tensor) -> Tensor:
    """Inner product over the last dimension, broadcasting leading (batch) dimensions."""
    return (a * b).sum(-1)


def matvec(m: Tensor, v: Tensor) -> Tensor:
    """``m @ v`` for ``m`` of shape ``(..., r, c)`` and points ``v`` of shape ``(N, c)``."""
    return (m @ v.unsqueeze(-1)).squeeze(-1)


def normal_init(shape: tuple[int, ...], scale: float) -> nn.Parameter:
    """A parameter drawn from ``N(0, scale²)`` (uses torch's global RNG, seeded by the user)."""
    return nn.Parameter(torch.randn(shape) * scale)
