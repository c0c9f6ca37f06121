"""``Flow``: a source density pushed through layer stacks, with exact likelihood."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Transform, TransformedDistribution, constraints

from flowprobe.distributions import Density
from flowprobe.layers.base import FlowLayer, LayerView, RawParams, stream
from flowprobe.validation import check_like, check_points

__all__ = ["Flow", "FlowDistribution", "FlowTransform"]

StackParams = Sequence[RawParams | None] | None


class Flow(nn.Module):
    r"""A normalizing flow :math:`x = f_K \circ \cdots \circ f_1(z)`, :math:`z \sim q`.

    Change of variables: :math:`\log p(x) = \log q(z_0) - \sum_k \log|\det J_{f_k}(z_{k-1})|`.
    ``log_prob`` evaluates it at any ``x`` through the layers' inverses; ``rsample_and_log_prob``
    uses only the cheap forward direction.

    The flow composes the layer stacks it is given and never changes them: their parameters are
    the flow's (``flow.stacks[j].u`` is the object you built), and an optimiser made on them
    before the flow existed trains the flow. ``flow.layers`` lists every layer as a
    :class:`~flowprobe.layers.base.LayerView`.

    Ensembles: stacks built with ``ensemble=E`` make ``E`` independent flows evaluated in the same
    ops; points are ``(*E, N, dim)`` (``(N, dim)`` is seen by every member) and log-densities
    ``(*E, N)``. Stacks without an ensemble shape are shared by every member; so is a source without
    one (an ensemble source, e.g. ``FullNormal`` with ``loc`` of shape ``(*E, dim)``, gives each member
    its own).

    Without autograd, evaluation streams over chunks of points, so its memory does not grow with
    the depth.

    Args:
        base: The source density ``q`` (e.g. :class:`~flowprobe.StandardNormal`, or a trainable
            :class:`~flowprobe.FullNormal`).
        layers: Layer stacks applied in order, all of dimension ``base.dim``.
    """

    def __init__(self, base: Density, layers: Sequence[FlowLayer]) -> None:
        super().__init__()
        shapes = set()
        for i, stack in enumerate(layers):
            if not isinstance(stack, FlowLayer):
                raise ValueError(f"layer {i} is a {type(stack).__name__}, not a flowprobe layer family (FlowLayer)")
            if stack.dim != base.dim:
                raise ValueError(f"layer {i} ({type(stack).__name__}) has dim {stack.dim}, base has dim {base.dim}")
            if stack.ensemble_shape:
                shapes.add(stack.ensemble_shape)
        if base.ensemble_shape:
            shapes.add(base.ensemble_shape)
        if len(shapes) > 1:
            raise ValueError(f"layer stacks and source have different ensemble shapes: {sorted(shapes)}")
        self.base = base
        self.stacks = nn.ModuleList(layers)
        self.dim = base.dim
        self.ensemble_shape: tuple[int, ...] = shapes.pop() if shapes else ()

    @property
    def layers(self) -> tuple[LayerView, ...]:
        """Every layer, in order (views into the stacks)."""
        return tuple(view for stack in self.stacks for view in stack)

    @property
    def depth(self) -> int:
        """The number of layers."""
        return sum(stack.depth for stack in self.stacks)

    # -- evaluation ------------------------------------------------------------------------
    def _check(self, points: Tensor, name: str) -> Tensor:
        points = check_like(check_points(points, self.dim, name, self.ensemble_shape), self, name)
        if self.ensemble_shape and points.dim() == 2:
            points = points.expand(*self.ensemble_shape, *points.shape)
        return points

    def _stack_params(self, params: StackParams) -> list[RawParams | None]:
        if params is None:
            return [None] * len(self.stacks)
        if len(params) != len(self.stacks):
            raise ValueError(f"params must hold one entry per layer stack ({len(self.stacks)}), got {len(params)}")
        return list(params)

    def _run(self, points: Tensor, params: StackParams, inverse: bool) -> tuple[Tensor, Tensor]:
        # constrained once per call, not per chunk (they depend on the points' rank only)
        pairs = [(stack, stack.constrain(stack._run_raw(points, p)))
                 for stack, p in zip(self.stacks, self._stack_params(params), strict=True)]

        def run(chunk: Tensor) -> tuple[Tensor, Tensor]:
            logdet = chunk.new_zeros(chunk.shape[:-1])
            for stack, constrained in reversed(pairs) if inverse else pairs:
                chunk, ld = stack.inverse_run(chunk, constrained) if inverse else stack.forward_run(chunk, constrained)
                logdet = logdet + ld
            return chunk, logdet

        if params is not None:
            return run(points)
        return stream(run, points, sum(stack.stream_width() for stack in self.stacks))

    def forward(self, z: Tensor, params: StackParams = None) -> tuple[Tensor, Tensor]:
        """Push source points through all layers.

        Args:
            z: ``(N, dim)`` (or ``(*E, N, dim)`` for an ensemble).
            params: Optional raw parameters per stack (``None`` entries use the stack's own), each
                ``{name: (*B, K, *shape)}`` as :meth:`FlowLayer.unflatten` makes them.

        Returns:
            ``(x, logdet)``: data points and ``Σ_k log|det J_k|``.
        """
        return self._run(self._check(z, "z"), params, inverse=False)

    def inverse(self, x: Tensor, params: StackParams = None) -> tuple[Tensor, Tensor]:
        """Pull data points back to the source; returns ``(z, log|det ∂z/∂x|)``."""
        return self._run(self._check(x, "x"), params, inverse=True)

    def _base_log_prob(self, z: Tensor) -> Tensor:
        if self.base.ensemble_shape:
            return self.base._log_prob(z)
        return self.base._log_prob(z.reshape(-1, self.dim)).reshape(z.shape[:-1])

    def log_prob(self, x: Tensor, params: StackParams = None) -> Tensor:
        """Exact log-density of the flow at ``x`` (through the inverses), shape ``(..., N)``."""
        z, logdet_inv = self.inverse(x, params)
        return self._base_log_prob(z) + logdet_inv

    def _source(self, n: int) -> Tensor:
        if self.base.ensemble_shape:
            return self.base.rsample(n)
        members = math.prod(self.ensemble_shape)
        return self.base.rsample(n * members).reshape(*self.ensemble_shape, n, self.dim)

    def rsample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` reparametrised samples (per ensemble member) and their log-density, forward direction only."""
        z = self._source(n)
        x, logdet = self.forward(z)
        return x, self._base_log_prob(z) - logdet

    def rsample(self, n: int) -> Tensor:
        """``n`` reparametrised samples, shape ``(*E, n, dim)``."""
        return self.forward(self._source(n))[0]

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` samples without gradient, shape ``(*E, n, dim)``."""
        return self.rsample(n)

    @torch.no_grad()
    def stages(self, z: Tensor) -> list[Tensor]:
        """The points before the first and after every layer: ``[z, f_1(z), …, f(z)]``."""
        out = [self._check(z, "z")]
        for view in self.layers:
            out.append(view(out[-1])[0])
        return out

    # -- ensembles -------------------------------------------------------------------------
    def member(self, index: int | tuple[int, ...]) -> Flow:
        """Ensemble member ``index`` as a stand-alone flow (a copy; stacks and a source without an ensemble are
        copied too).

        Raises:
            ValueError: the flow is not an ensemble.
        """
        if not self.ensemble_shape:
            raise ValueError("this flow is not an ensemble")
        index = (index,) if isinstance(index, int) else tuple(index)
        solo = copy.deepcopy(self)
        for stack in solo.stacks:
            if stack.ensemble_shape:
                for name, p in list(stack.named_parameters(recurse=False)):
                    stack.register_parameter(name, nn.Parameter(p.detach()[index].clone(), p.requires_grad))
                stack.ensemble_shape = ()
        if self.base.ensemble_shape:
            solo.base = self.base.member(index)
        solo.ensemble_shape = ()
        return solo

    def as_distribution(self) -> FlowDistribution:
        """This flow as a ``torch.distributions.TransformedDistribution`` (event shape ``(dim,)``)."""
        if self.ensemble_shape:
            raise ValueError("an ensemble is not one distribution; use flow.member(i).as_distribution()")
        return FlowDistribution(self)


def _flat(x: Tensor, dim: int) -> tuple[Tensor, torch.Size]:
    return x.reshape(-1, dim), x.shape[:-1]


class FlowTransform(Transform):
    """A :class:`Flow`'s layers as a ``torch.distributions.Transform`` (any leading shape).

    Args:
        flow: The flow.
        cache_size: 0 or 1, as for any ``Transform``.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, flow: Flow, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        self.flow = flow
        self._last: tuple[Tensor, Tensor, Tensor] | None = None  # (x, y, logdet at x)

    def with_cache(self, cache_size: int = 1) -> FlowTransform:
        return self if self._cache_size == cache_size else FlowTransform(self.flow, cache_size)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlowTransform) and other.flow is self.flow

    def __hash__(self) -> int:
        return id(self.flow)

    def _apply(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        flat, shape = _flat(x, self.flow.dim)
        if flat.shape[0] == 0:
            return x.clone(), x.new_zeros(shape)
        y, logdet = self.flow.inverse(flat) if inverse else self.flow(flat)
        return y.reshape(*shape, -1), logdet.reshape(shape)

    def _call(self, x: Tensor) -> Tensor:
        y, logdet = self._apply(x, inverse=False)
        self._last = (x, y, logdet)
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        x, logdet_inv = self._apply(y, inverse=True)
        self._last = (x, y, -logdet_inv)
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        if self._last is not None and self._last[0] is x and self._last[1] is y:
            return self._last[2]
        return self._apply(x, inverse=False)[1]


class _SourceDistribution(Distribution):
    """A flowprobe :class:`Density` as a ``torch.distributions.Distribution`` (optionally batched)."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, density: Density, batch_shape: torch.Size = torch.Size()) -> None:  # noqa: B008
        self.density = density
        super().__init__(torch.Size(batch_shape), torch.Size([density.dim]), validate_args=False)

    def expand(self, batch_shape: Sequence[int], _instance: Distribution | None = None) -> _SourceDistribution:
        return _SourceDistribution(self.density, torch.Size(batch_shape))

    def rsample(self, sample_shape: Sequence[int] = torch.Size()) -> Tensor:  # noqa: B008
        shape = self._extended_shape(torch.Size(sample_shape))
        n = shape[:-1].numel()
        if n == 0:
            anchor = self.density.anchor
            return torch.empty(shape, dtype=anchor.dtype, device=anchor.device)
        return self.density.rsample(n).reshape(shape)

    def log_prob(self, value: Tensor) -> Tensor:
        flat, shape = _flat(value, self.density.dim)
        if flat.shape[0] == 0:
            return value.new_zeros(shape)
        return self.density.log_prob(flat).reshape(shape)


class FlowDistribution(TransformedDistribution):
    """A :class:`Flow` as a torch ``TransformedDistribution`` of its source."""

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        super().__init__(_SourceDistribution(flow.base), [FlowTransform(flow)], validate_args=False)

    def expand(self, batch_shape: Sequence[int], _instance: Distribution | None = None) -> TransformedDistribution:
        """The same flow over a batch of independent copies (shape ``batch_shape``)."""
        return TransformedDistribution(
            self.base_dist.expand(batch_shape), self.transforms, validate_args=False
        )
