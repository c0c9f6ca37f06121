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

The families, their words and keys come from the registry (:func:`flowprobe.layers.families`):
a registered family is usable in specs at once. Each term becomes one layer stack.
"""

from __future__ import annotations

from typing import Any

import torch

from flowprobe.distributions import StandardNormal
from flowprobe.flow import Flow
from flowprobe.layers import FlowLayer, get_family

__all__ = ["MAX_LAYERS", "build_flow", "build_layers", "parse_spec"]

MAX_LAYERS = 10_000


def parse_spec(spec: str) -> list[tuple[str, int, dict[str, Any]]]:
    """Parse a flow spec into ``[(family, count, options), …]`` without building anything.

    Raises:
        ValueError: naming the offending term and token.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"flow spec must be a non-empty string like 'planar:32:tanh', got {spec!r}")
    terms = []
    for term in spec.replace(" ", "").split("+"):
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
    """A flow ``N(0, I_dim)`` → data from a spec string, e.g. ``build_flow("planar:32:tanh", 2)``.

    Args:
        spec: See the module docstring.
        dim: Dimension of the points.
        dtype: Floating-point type of the parameters (default: torch's default dtype).
        ensemble: Ensemble shape: that many independent flows of this architecture in one.

    Raises:
        ValueError: an unknown family / option / value, naming the bad token.
    """
    flow = Flow(StandardNormal(dim), build_layers(spec, dim, ensemble))
    return flow.to(dtype) if dtype is not None else flow
