"""The mechanism every flowprobe layer family shares: a stack of ``K`` layers with batched parameters.

Direction convention (stated once, used everywhere): layers map **source → data**::

    x, logdet = layer(z)            # logdet = log|det ∂x/∂z| at z
    z, logdet_inv = layer.inverse(x)  # logdet_inv = log|det ∂z/∂x| at x = −logdet at z

A family class (:class:`~flowprobe.Planar`, :class:`~flowprobe.Radial`, …) holds the *raw*
(unconstrained) parameters of ``K ≥ 1`` layers, stacked along a layer axis: ``Planar(2, layers=32)``
owns one ``u`` of shape ``(32, 2)``; ``K = 1`` is an ordinary single layer. ``stack[i]`` is a
:class:`LayerView` of layer ``i``: it reads (differentiable) slices of the stack's parameters and
never owns or changes any.

**Parameter batch dimensions.** Raw parameters have the shape ``(*B, K, *shape)``:

* ``B = ()`` — shared by every point (the stack's own parameters);
* ``B = E`` — an *ensemble* of ``E`` independent flows of one architecture
  (``Planar(2, layers=32, ensemble=8)``): points ``(*E, N, d)`` (or ``(N, d)``, seen by every
  member), outputs ``(*E, N, d)``; the members are evaluated and trained in the same ops;
* ``B = (N,)`` (or ``(*E, N)``) — one parameter set per point (amortised flows, e.g. a VAE
  encoder's output): ``layer(z, params=layer.unflatten(head(features)))``.

Each family states its math once: ``constrain`` (raw → parameters of the formula, enforcing
invertibility for any raw value) and the one-layer ``transform`` / ``invert`` written with
broadcasting over any leading dimensions; the run kernels ``forward_run`` / ``inverse_run`` loop
over the layers with them (plain differentiable ops, also what ``torch.compile`` traces), and a
family may override them with fused kernels for its shared-parameter runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from flowprobe.validation import check_like, check_points, validation_enabled

__all__ = [
    "FlowLayer",
    "InverseNotAvailable",
    "Invertibility",
    "LayerView",
    "RawParams",
    "fused_kernels",
    "fused_kernels_allowed",
    "inner",
    "layer_slice",
    "stream",
    "uses_fused_kernels",
]

RawParams = Mapping[str, Tensor]
MAX_RAW_VALUES = 10**9  # parameters of one stack (E·K·per-layer values): refuse what cannot fit
STREAM_BYTES = 2**25  # without autograd, per-layer buffers of a chunk of points stay below this

_FUSED = True


@contextmanager
def fused_kernels(enabled: bool) -> Iterator[None]:
    """Switch the families' fused run kernels on or off for a block (on by default).

    Off, every run is evaluated layer by layer with the one-layer formulas (plain differentiable
    ops, e.g. for double backward; the fused backwards are once-differentiable).
    """
    global _FUSED
    previous, _FUSED = _FUSED, bool(enabled)
    try:
        yield
    finally:
        _FUSED = previous


def fused_kernels_allowed() -> bool:
    """Whether fused kernels may run now: switched on (:func:`fused_kernels`) and eager (not traced by
    ``torch.compile``, not inside a ``torch.func`` transform)."""
    return _FUSED and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def uses_fused_kernels(points: Tensor, shared: bool) -> bool:
    """Whether a run may take its family's fused kernel: ``shared`` parameters (no batch
    dimensions), points ``(N, d)``, and :func:`fused_kernels_allowed`."""
    return shared and points.dim() == 2 and fused_kernels_allowed()


def stream(fn: Callable[[Tensor], tuple[Tensor, Tensor]], points: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """``fn(points)`` in chunks of points when nothing records gradients.

    Fused kernels keep ``width`` values per point (about two per layer and neuron) for the length
    of a call; chunking keeps that below :data:`STREAM_BYTES` whatever the depth, so evaluation
    without autograd needs memory ``O(N·d)``. With autograd the intermediates are needed and the
    call is not split.
    """
    n = points.shape[-2]
    chunk = max(1024, STREAM_BYTES // max(1, width * points.element_size()))
    if torch.is_grad_enabled() or n <= 2 * chunk:  # up to twice the budget rather than a sliver of a chunk
        return fn(points)
    parts = -(-n // chunk)
    outs = [fn(part) for part in points.split(-(-n // parts), dim=-2)]  # equal chunks
    return torch.cat([o[0] for o in outs], dim=-2), torch.cat([o[1] for o in outs], dim=-1)


def inner(a: Tensor, b: Tensor) -> Tensor:
    """Inner product over the last dimension, broadcasting leading (batch) dimensions."""
    return (a * b).sum(-1)


class InverseNotAvailable(NotImplementedError):  # noqa: N818 (nflows' name)
    """Raised when a layer cannot be inverted with its current parameters."""


@dataclass(frozen=True)
class Invertibility:
    """Report of an invertibility condition at the current parameters.

    Attributes:
        invertible: Whether the sufficient condition holds.
        margin: The smallest value of the quantity that must stay positive (e.g. the minimum
            slope ``1 + wᵀû·sup h'`` of a planar layer) over the layers (and ensemble members)
            reported on; ``invertible`` iff ``margin > 0``.
        condition: The condition in words.
    """

    invertible: bool
    margin: float
    condition: str


def layer_slice(params: Any, index: int | slice) -> Any:
    """Layer ``index`` of constrained parameters in run layout (layer axis first).

    Works for a tensor, a dict of tensors or a NamedTuple of tensors.
    """
    if isinstance(params, Tensor):
        return params[index]
    if isinstance(params, dict):
        return {k: v[index] for k, v in params.items()}
    return type(params)(*(v[index] for v in params))


def _ensemble_shape(ensemble: int | Sequence[int]) -> tuple[int, ...]:
    shape = (ensemble,) if isinstance(ensemble, int) else tuple(ensemble)
    if not all(isinstance(e, int) and e >= 1 for e in shape):
        raise ValueError(f"ensemble must be a positive integer or a tuple of them, got {ensemble!r}")
    return shape


class FlowLayer(nn.Module):
    """Base class of layer families: ``K`` invertible layers ``x = f_K ∘ ⋯ ∘ f_1(z)`` on ``R^dim``.

    A subclass sets :attr:`family` (its name in spec strings), implements :meth:`init_raw` (one
    layer's raw parameters, drawn from torch's global RNG), :meth:`constrain`, :meth:`transform`,
    :meth:`invert` and :meth:`invertibility`, and registers itself with
    :func:`flowprobe.layers.registry.register`.

    Args:
        dim: Dimension of the points.
        layers: Number ``K`` of layers in the stack.
        ensemble: Ensemble shape ``E`` (an int or a tuple; default none): ``E`` independent stacks
            of this architecture, each initialised by its own draws.
    """

    family: ClassVar[str] = ""
    per_layer_attributes: ClassVar[tuple[str, ...]] = ()  # tuples of length K, e.g. Sylvester's flips

    def __init__(self, dim: int, layers: int = 1, ensemble: int | Sequence[int] = ()) -> None:
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise ValueError(f"layers must be a positive integer, got {layers!r}")
        self.dim = dim
        self.depth = layers
        self.ensemble_shape = _ensemble_shape(ensemble)

    # -- parameters ------------------------------------------------------------------------
    def init_raw(self) -> dict[str, Tensor]:
        """One layer's raw parameters (unbatched shapes), drawn from torch's global RNG."""
        raise NotImplementedError

    def identity_raw(self, raw: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """Raw parameters (any leading shape) that make each layer the identity map, the values a first
        gradient step needs left as given (so that training can leave the identity); ``None`` where the
        family, with these settings, has no such point. :meth:`start_at_identity` applies it."""
        return None

    def start_at_identity(self) -> bool:
        """Make every layer (and ensemble member) the identity map (:meth:`identity_raw`); returns whether
        it could (a family without an identity is left unchanged)."""
        new = self.identity_raw(self.own_raw())
        if new is None:
            return False
        with torch.no_grad():
            for name, value in new.items():
                self._parameters[name].copy_(value)
        return True

    def _init_parameters(self) -> None:
        """Register the raw parameters ``(*E, K, *shape)``, drawn member by member, layer by layer.

        Drawing layer by layer keeps a stack's initial values those of ``K`` single layers built in
        sequence with the same seed.
        """
        first = self.init_raw()
        per_layer = sum(v.numel() for v in first.values())
        members = math.prod(self.ensemble_shape)
        if per_layer * self.depth * members > MAX_RAW_VALUES:
            raise ValueError(
                f"{type(self).__name__}: {members} × {self.depth} layers × {per_layer} values exceed "
                f"{MAX_RAW_VALUES:.0e} parameters"
            )
        draws = [first] + [self.init_raw() for _ in range(members * self.depth - 1)]
        for name, value in first.items():
            stacked = torch.stack([d[name] for d in draws]).reshape(*self.ensemble_shape, self.depth, *value.shape)
            self.register_parameter(name, nn.Parameter(stacked))

    def raw_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and per-layer shapes of the raw parameters."""
        lead = len(self.ensemble_shape) + 1
        return {name: tuple(p.shape[lead:]) for name, p in self.named_parameters(recurse=False)}

    @property
    def raw_numel(self) -> int:
        """Raw values of the whole stack per parameter set: the width a network must output to
        amortise it (see :meth:`unflatten`)."""
        return self.depth * sum(math.prod(shape) for shape in self.raw_shapes().values())

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a ``(*B, raw_numel)`` tensor (e.g. a network head) into raw parameters ``(*B, K, *shape)``."""
        if flat.dim() < 1 or flat.shape[-1] != self.raw_numel:
            raise ValueError(f"flat parameters must have shape (..., {self.raw_numel}), got {tuple(flat.shape)}")
        lead = flat.shape[:-1]
        flat = flat.reshape(*lead, self.depth, -1)
        out, start = {}, 0
        for name, shape in self.raw_shapes().items():
            size = math.prod(shape)
            out[name] = flat[..., start : start + size].reshape(*lead, self.depth, *shape)
            start += size
        return out

    def own_raw(self) -> dict[str, Tensor]:
        """The stack's raw parameters, ``{name: (*E, K, *shape)}``."""
        return dict(self.named_parameters(recurse=False))

    def _run_raw(self, points: Tensor, params: RawParams | None) -> dict[str, Tensor]:
        """Raw parameters in run layout ``(K, *B', *shape)``, ``B'`` broadcasting with ``points[..., :-1]``."""
        lead = points.dim() - 1
        if params is None:
            e = len(self.ensemble_shape)
            if not e:  # shared: (K, *shape) broadcasts against any points
                return dict(self.named_parameters(recurse=False))
            index = (slice(None),) * (e + 1) + (None,) * (lead - e)  # singletons for the point axes
            return {name: p.movedim(e, 0)[index] for name, p in self.named_parameters(recurse=False)}
        shapes = self.raw_shapes()
        if validation_enabled():
            if set(params) != set(shapes):
                raise ValueError(f"params must have keys {sorted(shapes)}, got {sorted(params)}")
            for name, shape in shapes.items():
                value = params[name]
                tail = (self.depth, *shape)
                batch = tuple(value.shape[: value.dim() - len(tail)])
                if tuple(value.shape[len(batch):]) != tail or not _broadcasts(batch, points.shape[:-1]):
                    expected = f"(*B, {', '.join(map(str, tail))}) with B broadcasting to {tuple(points.shape[:-1])}"
                    raise ValueError(f"params[{name!r}] must have shape {expected}, got {tuple(value.shape)}")
        return {name: params[name].movedim(params[name].dim() - len(shape) - 1, 0) for name, shape in shapes.items()}

    # -- the family's math -----------------------------------------------------------------
    def constrain(self, raw: dict[str, Tensor]) -> Any:
        """Map raw parameters in run layout ``(K, *B, *shape)`` to constrained ones (layer axis first)."""
        raise NotImplementedError

    def transform(self, z: Tensor, p: Any) -> tuple[Tensor, Tensor]:
        """One layer: ``x, log|det ∂x/∂z|`` for constrained parameters ``p`` (no validation)."""
        raise NotImplementedError

    def invert(self, x: Tensor, p: Any) -> tuple[Tensor, Tensor]:
        """One layer: ``z, log|det ∂z/∂x|`` for constrained parameters ``p`` (no validation)."""
        raise NotImplementedError

    def forward_run(self, z: Tensor, p: Any) -> tuple[Tensor, Tensor]:
        """All layers of ``p`` (run layout) in order; families override it with fused kernels."""
        logdet = None
        for layer in unbind_layers(p):
            z, ld = self.transform(z, layer)
            logdet = ld if logdet is None else logdet + ld
        return z, logdet  # type: ignore[return-value]

    def inverse_run(self, x: Tensor, p: Any) -> tuple[Tensor, Tensor]:
        """All layers of ``p`` (run layout) in reverse order."""
        logdet = None
        for layer in reversed(unbind_layers(p)):
            x, ld = self.invert(x, layer)
            logdet = ld if logdet is None else logdet + ld
        return x, logdet  # type: ignore[return-value]

    def invertibility(self, layer: int | None = None) -> Invertibility:
        """Whether the current parameters satisfy the invertibility condition: at ``layer``, or the
        worst over every layer and ensemble member."""
        raise NotImplementedError

    def set_constrained(self, *args: Any, layer: int | None = None, **kwargs: Any) -> None:
        """Set the raw parameters of ``layer`` (may be omitted when ``K = 1``) so that the
        constrained ones are exactly the given values (every ensemble member alike)."""
        raise NotImplementedError(f"{type(self).__name__} has no set_constrained")

    def _layer_index(self, layer: int | None) -> int:
        if layer is None:
            if self.depth != 1:
                raise ValueError(f"this stack has {self.depth} layers: say which (layer=i, or stack[i])")
            return 0
        if not -self.depth <= layer < self.depth:
            raise IndexError(f"layer {layer} out of range for a stack of {self.depth}")
        return layer % self.depth

    def _write(self, name: str, layer: int, value: Tensor) -> None:
        """Write ``value`` (per-layer shape) into raw parameter ``name`` at ``layer`` for every member."""
        p = self._parameters[name]
        with torch.no_grad():
            p.select(len(self.ensemble_shape), layer).copy_(torch.as_tensor(value, dtype=p.dtype, device=p.device))

    def _report(self, margins: Tensor, layer: int | None, condition: str) -> Invertibility:
        """An :class:`Invertibility` from per-layer margins in run layout (layer axis first): the
        smallest over ``layer`` (every layer for ``None``) and every ensemble member."""
        values = margins.detach() if layer is None else margins.detach()[self._layer_index(layer)]
        margin = float(values.min())
        return Invertibility(margin > 0, margin, condition)

    def stream_width(self) -> int:
        """An upper bound on the values per point the run kernels keep for a call (sets the chunk
        size of streamed evaluation, see :func:`stream`)."""
        return 2 * self.depth * self.dim

    def residual_form(self, p: Any) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(A, B, b)`` with ``f(z) = z + A h(Bᵀz + b)`` for one layer's constrained parameters
        (shapes ``(..., d, m)``, ``(..., d, m)``, ``(..., m)``), if the family has that form (Kong &
        Chaudhuri's class); ``None`` otherwise."""
        return None

    @property
    def activation(self) -> Any:
        """The activation ``h`` of the residual form, if any."""
        return getattr(self, "act", None)

    # -- public API ------------------------------------------------------------------------
    def check(self, points: Tensor, name: str = "z") -> Tensor:
        """Validate points ``(N, dim)`` (or ``(*E, N, dim)`` for an ensemble) and expand ``(N, dim)``
        to every ensemble member."""
        points = check_like(check_points(points, self.dim, name, self.ensemble_shape), self, name)
        if self.ensemble_shape and points.dim() == 2:
            points = points.expand(*self.ensemble_shape, *points.shape)
        return points

    def constrained(self, params: RawParams | None = None) -> Any:
        """The constrained parameters of the formula in run layout, ``(K, *B, *shape)``: the
        stack's own (``B`` = the ensemble shape) or those of raw ``params`` ``(*B, K, *shape)``."""
        if params is None:
            e = len(self.ensemble_shape)
            return self.constrain({name: p.movedim(e, 0) for name, p in self.named_parameters(recurse=False)})
        shapes = self.raw_shapes()
        return self.constrain({n: params[n].movedim(params[n].dim() - len(s) - 1, 0) for n, s in shapes.items()})

    def forward(self, z: Tensor, params: RawParams | None = None) -> tuple[Tensor, Tensor]:
        """Map source points to data points through the ``K`` layers.

        Args:
            z: Points ``(N, dim)``, or ``(*E, N, dim)`` for an ensemble.
            params: Optional raw parameters ``{name: (*B, K, *shape)}`` (e.g. one set per point);
                defaults to the stack's own.

        Returns:
            ``(x, logdet)`` with shapes ``(..., N, dim)`` and ``(..., N)``.
        """
        z = self.check(z, "z")
        return self.forward_run(z, self.constrain(self._run_raw(z, params)))

    def inverse(self, x: Tensor, params: RawParams | None = None) -> tuple[Tensor, Tensor]:
        """Map data points back to source points.

        Returns:
            ``(z, logdet_inv)`` where ``logdet_inv = log|det ∂z/∂x|`` (minus the forward log-det).
        """
        x = self.check(x, "x")
        return self.inverse_run(x, self.constrain(self._run_raw(x, params)))

    # -- per-layer access -------------------------------------------------------------------
    def __len__(self) -> int:
        return self.depth

    def __getitem__(self, index: int) -> LayerView:
        if not isinstance(index, int):
            raise TypeError(f"a layer stack is indexed by an int, got {type(index).__name__}")
        if not -self.depth <= index < self.depth:
            raise IndexError(f"layer {index} out of range for a stack of {self.depth}")
        return LayerView(self, index % self.depth)

    def __iter__(self) -> Iterator[LayerView]:
        return (LayerView(self, i) for i in range(self.depth))

    def _settings(self) -> str:
        """Family settings for ``repr`` (override to add options)."""
        return ""

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}", f"layers={self.depth}"]
        if self.ensemble_shape:
            parts.append(f"ensemble={self.ensemble_shape}")
        return ", ".join(parts + ([self._settings()] if self._settings() else []))


def unbind_layers(params: Any) -> list[Any]:
    """Every layer's constrained parameters of a run (layer axis first), by one ``unbind`` per tensor.

    Unlike indexing layer by layer, whose backward writes each layer's gradient into a zero-filled
    tensor of the whole run (``O(K²)`` work with per-point parameters), the backward of ``unbind``
    stacks the ``K`` gradients once.
    """
    if isinstance(params, Tensor):
        return list(params.unbind(0))
    if isinstance(params, dict):
        columns = {k: v.unbind(0) for k, v in params.items()}
        return [dict(zip(columns, values)) for values in zip(*columns.values())]
    return [type(params)(*values) for values in zip(*(v.unbind(0) for v in params))]


def _broadcasts(batch: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether ``batch`` broadcasts to ``target`` without changing it (right-aligned)."""
    if len(batch) > len(target):
        return False
    return all(b in (1, t) for b, t in zip(reversed(batch), reversed(target)))


class LayerView:
    """Layer ``index`` of a stack: reads slices of the stack's parameters, owns none.

    ``view.u`` is ``stack.u[..., index, :]`` (differentiable), ``view(z)`` / ``view.inverse(x)``
    evaluate that layer alone, ``view.invertibility()`` reports on it and
    ``view.set_constrained(...)`` writes into the stack's parameters at ``index``. Settings of the
    family (``act``, ``min_slope``, …) read through to the stack; per-layer settings
    (:attr:`FlowLayer.per_layer_attributes`) give this layer's entry.
    """

    __slots__ = ("stack", "index")

    def __init__(self, stack: FlowLayer, index: int) -> None:
        self.stack, self.index = stack, index

    def __getattr__(self, name: str) -> Any:
        stack = object.__getattribute__(self, "stack")
        index = object.__getattribute__(self, "index")
        if name in stack._parameters:
            return stack._parameters[name].select(len(stack.ensemble_shape), index)
        if name in type(stack).per_layer_attributes:
            return getattr(stack, name)[index]
        return getattr(stack, name)

    @property
    def dim(self) -> int:
        return self.stack.dim

    def _params(self, points: Tensor, params: RawParams | None) -> Any:
        # the whole stack is constrained, then sliced: a layer's parameters may depend on its index
        p = self.stack.constrain(self.stack._run_raw(points, params))
        return layer_slice(p, slice(self.index, self.index + 1))

    def constrained(self, params: RawParams | None = None) -> Any:
        """This layer's constrained parameters (run layout with a layer axis of length 1)."""
        return layer_slice(self.stack.constrained(params), slice(self.index, self.index + 1))

    def __call__(self, z: Tensor, params: RawParams | None = None) -> tuple[Tensor, Tensor]:
        return self.forward(z, params)

    def forward(self, z: Tensor, params: RawParams | None = None) -> tuple[Tensor, Tensor]:
        """This layer alone, source → data."""
        z = self.stack.check(z, "z")
        return self.stack.forward_run(z, self._params(z, params))

    def inverse(self, x: Tensor, params: RawParams | None = None) -> tuple[Tensor, Tensor]:
        """This layer alone, data → source."""
        x = self.stack.check(x, "x")
        return self.stack.inverse_run(x, self._params(x, params))

    def invertibility(self) -> Invertibility:
        """The stack's invertibility condition at this layer."""
        return self.stack.invertibility(self.index)

    def set_constrained(self, *args: Any, **kwargs: Any) -> None:
        """Set this layer's raw parameters so that the constrained ones are the given values."""
        self.stack.set_constrained(*args, layer=self.index, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self.stack).__name__}[{self.index}]({self.stack.extra_repr()})"
