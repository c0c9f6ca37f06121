"""Flow specifications as strings, shared by the command line and Python.

Grammar: terms joined with ``+``; each term is ``family:count`` followed by options separated by
``:``. An option is either a bare word (an activation name, or a Sylvester kind) or ``key=value``::

    planar:32:tanh                  32 planar layers with tanh (min_slope=0.05 by default)
    planar:8:leaky_relu:min_slope=0.1
    radial:16
    sylvester:8:orthogonal:m=2      8 O-SNF layers with 2 neurons (also householder, triangular)
    sylvester:4:triangular          T-SNF; consecutive layers alternate the flip permutation
    householder:4:k=2               4 layers of 2 reflections each
    planar:16+radial:4              a chain, applied left to right (source → data)

Keys: ``act`` (activation), ``min_slope``, ``m`` / ``hidden`` (Sylvester neurons),
``k`` / ``reflections`` (Householder reflections).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flowprobe.activations import ACTIVATIONS
from flowprobe.distributions import StandardNormal
from flowprobe.flow import Flow
from flowprobe.layers import FlowLayer, Householder, Planar, Radial, Sylvester
from flowprobe.layers.sylvester import KINDS

__all__ = ["FAMILIES", "build_flow", "build_layers", "parse_spec"]

_KEY_ALIASES = {"act": "activation", "m": "hidden", "k": "reflections"}
_INT_KEYS = {"hidden", "reflections"}
_FLOAT_KEYS = {"min_slope"}
MAX_LAYERS = 10_000


def _planar(dim: int, index: int, o: dict) -> FlowLayer:
    return Planar(dim, **o)


def _radial(dim: int, index: int, o: dict) -> FlowLayer:
    return Radial(dim, **o)


def _sylvester(dim: int, index: int, o: dict) -> FlowLayer:
    flip = o.get("kind") == "triangular" and index % 2 == 1
    return Sylvester(dim, flip=flip, **o)


def _householder(dim: int, index: int, o: dict) -> FlowLayer:
    return Householder(dim, **o)


# family -> (builder, allowed option keys)
FAMILIES: dict[str, tuple[Callable[[int, int, dict], FlowLayer], set[str]]] = {
    "planar": (_planar, {"activation", "min_slope"}),
    "radial": (_radial, {"min_slope"}),
    "sylvester": (_sylvester, {"kind", "activation", "hidden", "reflections", "min_slope"}),
    "householder": (_householder, {"reflections"}),
}


def _option(term: str, token: str) -> tuple[str, object]:
    if "=" not in token:
        if token in ACTIVATIONS:
            return "activation", token
        if token in KINDS:
            return "kind", token
        raise ValueError(
            f"flow spec term {term!r}: unknown option {token!r}; expected an activation "
            f"({', '.join(sorted(ACTIVATIONS))}), a Sylvester kind ({', '.join(KINDS)}) or key=value"
        )
    key, value = token.split("=", 1)
    key = _KEY_ALIASES.get(key, key)
    try:
        if key in _INT_KEYS:
            return key, int(value)
        if key in _FLOAT_KEYS:
            return key, float(value)
    except ValueError:
        raise ValueError(f"flow spec term {term!r}: bad value in {token!r}") from None
    if key == "activation" and value not in ACTIVATIONS:
        raise ValueError(f"flow spec term {term!r}: unknown activation {value!r}")
    if key == "kind" and value not in KINDS:
        raise ValueError(f"flow spec term {term!r}: unknown Sylvester kind {value!r}")
    if key not in ("activation", "kind"):
        raise ValueError(f"flow spec term {term!r}: unknown option key {key!r}")
    return key, value


def parse_spec(spec: str) -> list[tuple[str, int, dict]]:
    """Parse a flow spec into ``[(family, count, options), …]`` without building anything.

    Raises:
        ValueError: naming the offending term and token.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"flow spec must be a non-empty string like 'planar:32:tanh', got {spec!r}")
    terms = []
    for term in spec.replace(" ", "").split("+"):
        tokens = term.split(":")
        family = tokens[0]
        if family not in FAMILIES:
            known = ", ".join(FAMILIES)
            raise ValueError(f"flow spec: unknown layer family {family!r} in {term!r}; expected one of: {known}")
        if len(tokens) < 2 or not tokens[1].isdigit() or not 1 <= int(tokens[1]) <= MAX_LAYERS:
            count = tokens[1] if len(tokens) > 1 else ""
            raise ValueError(f"flow spec term {term!r}: layer count {count!r} must be an integer in [1, {MAX_LAYERS}]")
        options: dict = {}
        allowed = FAMILIES[family][1]
        for token in tokens[2:]:
            key, value = _option(term, token)
            if key not in allowed:
                raise ValueError(f"flow spec term {term!r}: option {token!r} does not apply to {family} layers")
            if key in options:
                raise ValueError(f"flow spec term {term!r}: option {key!r} given twice")
            options[key] = value
        terms.append((family, int(tokens[1]), options))
    return terms


def build_layers(spec: str, dim: int) -> list[FlowLayer]:
    """The layers of ``spec`` on ``R^dim`` (initialised with torch's global RNG)."""
    layers: list[FlowLayer] = []
    for family, count, options in parse_spec(spec):
        builder = FAMILIES[family][0]
        try:
            layers += [builder(dim, i, options) for i in range(count)]
        except (ValueError, TypeError) as err:
            raise ValueError(f"flow spec: {family} layers on R^{dim}: {err}") from None
    return layers


def build_flow(spec: str, dim: int, dtype: torch.dtype | None = None) -> Flow:
    """A flow ``N(0, I_dim)`` → data from a spec string, e.g. ``build_flow("planar:32:tanh", 2)``.

    Args:
        spec: See the module docstring.
        dim: Dimension of the points.
        dtype: Floating-point type of the parameters (default: torch's default dtype).

    Raises:
        ValueError: an unknown family / option / value, naming the bad token.
    """
    flow = Flow(StandardNormal(dim), build_layers(spec, dim))
    return flow.to(dtype) if dtype is not None else flow
