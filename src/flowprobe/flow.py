"""``Flow``: a source density pushed through a stack of layers, with exact likelihood."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Transform, TransformedDistribution, constraints

from flowprobe.distributions import Density
from flowprobe.layers import fused
from flowprobe.layers.base import FlowLayer, RawParams
from flowprobe.validation import check_points

__all__ = ["Flow"]


class Flow(nn.Module):
    r"""A normalizing flow :math:`x = f_K \circ \cdots \circ f_1(z)`, :math:`z \sim q`.

    Change of variables: :math:`\log p(x) = \log q(z_0) - \sum_k \log|\det J_{f_k}(z_{k-1})|`.
    ``log_prob`` evaluates it at any ``x`` through the layers' inverses; ``rsample_and_log_prob``
    uses only the cheap forward direction.

    Args:
        base: The source density ``q`` (e.g. :class:`~flowprobe.StandardNormal`).
        layers: Layers applied in order, all of dimension ``base.dim``.
    """

    def __init__(self, base: Density, layers: Sequence[FlowLayer]) -> None:
        super().__init__()
        for i, layer in enumerate(layers):
            if layer.dim != base.dim:
                raise ValueError(f"layer {i} ({type(layer).__name__}) has dim {layer.dim}, base has dim {base.dim}")
        self.base = base
        self.layers = nn.ModuleList(layers)
        self.dim = base.dim
        # Runs of same-family layers share stacked parameters and are evaluated fused (layers/fused.py).
        self.stacks = nn.ModuleList(fused.fuse(self.layers))
        self.register_state_dict_post_hook(fused.state_dict_hook)
        self.register_load_state_dict_pre_hook(fused.load_state_dict_pre_hook)

    def _params(self, params: Sequence[RawParams | None] | None, batch: int) -> list:
        if params is None:
            return [layer.constrained() for layer in self.layers]
        return [layer.constrained(p, batch) for layer, p in zip(self.layers, params)]

    def _fused(self, params: Sequence[RawParams | None] | None) -> bool:
        """Check ``params`` and say whether the fused path (own parameters only) applies."""
        if params is not None and len(params) != len(self.layers):
            raise ValueError(f"params must hold one entry per layer ({len(self.layers)}), got {len(params)}")
        return fused.usable(params) and len(self.layers) > 0

    def forward(self, z: Tensor, params: Sequence[RawParams | None] | None = None) -> tuple[Tensor, Tensor]:
        """Push source points through all layers.

        Args:
            z: ``(N, dim)``.
            params: Optional per-layer batched raw parameters (``None`` entries use the layer's own).

        Returns:
            ``(x, logdet)``: data points and ``Σ_k log|det J_k|``, shapes ``(N, dim)``, ``(N,)``.
        """
        z = check_points(z, self.dim, "z")
        if self._fused(params):
            return fused.forward_layers(self.layers, z)
        logdet = z.new_zeros(z.shape[0])
        for layer, p in zip(self.layers, self._params(params, z.shape[0])):
            z, ld = layer.transform(z, p)
            logdet = logdet + ld
        return z, logdet

    def inverse(self, x: Tensor, params: Sequence[RawParams | None] | None = None) -> tuple[Tensor, Tensor]:
        """Pull data points back to the source; returns ``(z, log|det ∂z/∂x|)``."""
        x = check_points(x, self.dim, "x")
        if self._fused(params):
            return fused.inverse_layers(self.layers, x)
        logdet = x.new_zeros(x.shape[0])
        pairs = list(zip(self.layers, self._params(params, x.shape[0])))
        for layer, p in reversed(pairs):
            x, ld = layer.invert(x, p)
            logdet = logdet + ld
        return x, logdet

    def log_prob(self, x: Tensor, params: Sequence[RawParams | None] | None = None) -> Tensor:
        """Exact log-density of the flow at ``x`` (through the inverses), shape ``(N,)``."""
        z, logdet_inv = self.inverse(x, params)
        return self.base._log_prob(z) + logdet_inv

    def rsample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` reparametrised samples and their log-density, forward direction only."""
        z = self.base.rsample(n)
        log_q = self.base._log_prob(z)
        x, logdet = self.forward(z)
        return x, log_q - logdet

    def rsample(self, n: int) -> Tensor:
        """``n`` reparametrised samples, shape ``(n, dim)``."""
        return self.forward(self.base.rsample(n))[0]

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` samples without gradient, shape ``(n, dim)``."""
        return self.rsample(n)

    @torch.no_grad()
    def stages(self, z: Tensor) -> list[Tensor]:
        """The points before the first and after every layer: ``[z, f_1(z), …, f(z)]``."""
        z = check_points(z, self.dim, "z")
        out = [z]
        for layer, p in zip(self.layers, self._params(None, z.shape[0])):
            out.append(layer.transform(out[-1], p)[0])
        return out

    def as_distribution(self) -> FlowDistribution:
        """This flow as a ``torch.distributions.TransformedDistribution`` (event shape ``(dim,)``)."""
        return FlowDistribution(self)


def _flat(x: Tensor, dim: int) -> tuple[Tensor, torch.Size]:
    return x.reshape(-1, dim), x.shape[:-1]


class FlowTransform(Transform):
    """A :class:`Flow`'s layers as a ``torch.distributions.Transform`` (any leading shape)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, flow: Flow) -> None:
        super().__init__(cache_size=1)
        self.flow = flow
        self._last: tuple[Tensor, Tensor, Tensor] | None = None  # (x, y, logdet at x)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlowTransform) and other.flow is self.flow

    def __hash__(self) -> int:
        return id(self.flow)

    def _call(self, x: Tensor) -> Tensor:
        flat, shape = _flat(x, self.flow.dim)
        y, logdet = self.flow(flat)
        y = y.reshape(*shape, -1)
        self._last = (x, y, logdet.reshape(shape))
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        flat, shape = _flat(y, self.flow.dim)
        x, logdet_inv = self.flow.inverse(flat)
        x = x.reshape(*shape, -1)
        self._last = (x, y, -logdet_inv.reshape(shape))
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        if self._last is not None and self._last[0] is x and self._last[1] is y:
            return self._last[2]
        flat, shape = _flat(x, self.flow.dim)
        return self.flow(flat)[1].reshape(shape)


class _SourceDistribution(Distribution):
    """A flowprobe :class:`Density` seen as a ``torch.distributions.Distribution``."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, density: Density) -> None:
        self.density = density
        super().__init__(event_shape=torch.Size([density.dim]), validate_args=False)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:  # noqa: B008
        shape = torch.Size(sample_shape)
        n = max(1, shape.numel())
        return self.density.rsample(n).reshape(*shape, self.density.dim)

    def log_prob(self, value: Tensor) -> Tensor:
        flat, shape = _flat(value, self.density.dim)
        return self.density.log_prob(flat).reshape(shape)


class FlowDistribution(TransformedDistribution):
    """A :class:`Flow` as a torch ``TransformedDistribution`` of its source."""

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        super().__init__(_SourceDistribution(flow.base), [FlowTransform(flow)], validate_args=False)
