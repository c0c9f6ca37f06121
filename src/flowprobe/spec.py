"""Flow specifications as strings, shared by the command line and Python.

Grammar: terms joined with ``+``; each term is ``family:count`` followed by options separated by
``:``. An option is either a bare word the family declares (an activation name, a Sylvester kind)
or ``key=value``::

    planar:32:tanh                  a stack of 32 planar layers with tanh (min_slope=0.05 by default)
    planar:8:leaky_relu:min_slope=0.1
    radial:16
    sylvester:8:orthogonal:m=2      8 O-SNF layers with 2 neurons (also householder, triangular)
    sylvester:4:triangular          T-SNF; consecutive layers alternate the flip permutation
    householder:4:k=2               4 layers of 2 reflections each
    planar:16+radial:4              a chain, applied left to right (source → data)
    gaussian:full>planar:8          the same layers on a trainable full-covariance Gaussian source

A spec may start with a source and ``>`` (:data:`flowprobe.sources.SOURCES`: ``normal``, the fixed
``N(0, I)`` that a spec without one gets, ``gaussian:diag`` or ``gaussian:full``).

The families, their words and keys come from the registry (:func:`flowprobe.layers.families`):
a registered family is usable in specs at once. Each term becomes one layer stack.
"""

from __future__ import annotations

from typing import Any

import torch

from flowprobe.flow import Flow
from flowprobe.layers import FlowLayer, get_family
from flowprobe.sources import SOURCES, build_source

__all__ = ["MAX_LAYERS", "build_flow", "build_layers", "default_spec", "parse_source", "parse_spec"]

MAX_LAYERS = 10_000
SOURCE_SEPARATOR = ">"


def _split(spec: str) -> tuple[str, str]:
    """``(source, layers)`` of a spec; the source is ``normal`` when the spec names none."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"flow spec must be a non-empty string like 'planar:32:tanh', got {spec!r}")
    source, sep, layers = spec.replace(" ", "").rpartition(SOURCE_SEPARATOR)
    if not sep:
        return "normal", layers
    if source not in SOURCES:
        raise ValueError(f"flow spec: unknown source {source!r} before {SOURCE_SEPARATOR!r}; expected one of: "
                         f"{', '.join(SOURCES)}")
    if not layers:
        raise ValueError(f"flow spec {spec!r} names a source but no layers after {SOURCE_SEPARATOR!r}")
    return source, layers


def parse_source(spec: str) -> str:
    """The source a spec names (a key of :data:`~flowprobe.sources.SOURCES`; ``normal`` if none).

    Raises:
        ValueError: an unknown source, or no layers after it.
    """
    return _split(spec)[0]


def parse_spec(spec: str) -> list[tuple[str, int, dict[str, Any]]]:
    """Parse a flow spec's layers into ``[(family, count, options), …]`` without building anything (its
    source, if any, is checked too: :func:`parse_source`).

    Raises:
        ValueError: naming the offending term and token.
    """
    terms = []
    for term in _split(spec)[1].split("+"):
        tokens = term.split(":")
        try:
            family = get_family(tokens[0])
        except ValueError as err:
            raise ValueError(f"flow spec: {err} (in {term!r})") from None
        if len(tokens) < 2 or not tokens[1].isdigit() or not 1 <= int(tokens[1]) <= MAX_LAYERS:
            count = tokens[1] if len(tokens) > 1 else ""
            raise ValueError(f"flow spec term {term!r}: layer count {count!r} must be an integer in [1, {MAX_LAYERS}]")
        options: dict[str, Any] = {}
        for token in tokens[2:]:
            try:
                key, value = family.option(token)
            except ValueError as err:
                raise ValueError(f"flow spec term {term!r}: {err}") from None
            if key in options:
                raise ValueError(f"flow spec term {term!r}: option {key!r} given twice")
            options[key] = value
        terms.append((family.name, int(tokens[1]), options))
    return terms


def build_layers(spec: str, dim: int, ensemble: int | tuple[int, ...] = ()) -> list[FlowLayer]:
    """One layer stack per term of ``spec`` on ``R^dim`` (initialised with torch's global RNG)."""
    stacks: list[FlowLayer] = []
    for name, count, options in parse_spec(spec):
        try:
            stacks.append(get_family(name).cls(dim, layers=count, ensemble=ensemble, **options))
        except (ValueError, TypeError) as err:
            raise ValueError(f"flow spec: {name} layers on R^{dim}: {err}") from None
    return stacks


def build_flow(
    spec: str, dim: int, dtype: torch.dtype | None = None, ensemble: int | tuple[int, ...] = ()
) -> Flow:
    """A flow source → data from a spec string, e.g. ``build_flow("planar:32:tanh", 2)`` (source
    ``N(0, I_dim)``) or ``build_flow("gaussian:full>planar:32:tanh", 2)``.

    Args:
        spec: See the module docstring.
        dim: Dimension of the points.
        dtype: Floating-point type of the parameters (default: torch's default dtype).
        ensemble: Ensemble shape: that many independent flows of this architecture in one (a
            trainable source gets per-member parameters too).

    Raises:
        ValueError: an unknown source / family / option / value, naming the bad token.
    """
    stacks = build_layers(spec, dim, ensemble)
    flow = Flow(build_source(parse_source(spec), dim, stacks[0].ensemble_shape), stacks)
    return flow.to(dtype) if dtype is not None else flow


FULL_SOURCE_MAX_DIM = 4096
"""Largest dimension whose default flow has a full-covariance source (``d(d+3)/2`` parameters, ``O(d²)``
per point); above it the default source is diagonal."""


def default_spec(dim: int) -> str:
    """The spec ``flowprobe fit --data`` uses without ``--flow``, chosen by the data's dimension ``d``:

        gaussian:full>sylvester:4:orthogonal:m=M+radial:8,    M = min(d, max(2, ⌊d/8⌋))

    A trainable full-covariance source, started at the data's moments, gives the flow the best
    Gaussian at step 0; the layers only add what a Gaussian lacks. Four orthogonal Sylvester layers
    with about ``d/8`` neurons bend the data in the directions that need it (``O(d·M)`` parameters and
    cost per layer), and eight radial layers add local bumps for ``O(d)`` each. It beat the Gaussian on
    all four bundled real sets and both toy sets of the recipe search (``examples/recipes.py``, README).
    Above :data:`FULL_SOURCE_MAX_DIM` the source is diagonal (``gaussian:diag``).

    Raises:
        ValueError: ``dim`` is not a positive integer.
    """
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    source = "gaussian:full" if dim <= FULL_SOURCE_MAX_DIM else "gaussian:diag"
    return f"{source}>sylvester:4:orthogonal:m={min(dim, max(2, dim // 8))}+radial:8"
