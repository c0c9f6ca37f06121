"""The registry of layer families: what exists, how spec strings name it, how tests exercise it.

A family module declares everything about itself and registers its class::

    @register(
        "planar",
        options=(activation_option(), Option("min_slope", float)),
        formula="z + û h(wᵀz + b)",
        inverse="bracketed Newton on a scalar monotone equation",
        examples=lambda dim: {f"planar-{a}": {"activation": a} for a in ACTIVATIONS},
    )
    class Planar(FlowLayer): ...

The spec parser (:mod:`flowprobe.spec`), the topology diagnostics (through
:meth:`FlowLayer.residual_form`), the documentation table (:func:`family_table`) and the generic
layer tests iterate :func:`families`; nothing else lists the families. A family defined outside
flowprobe registers the same way and works everywhere at once.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flowprobe.activations import ACTIVATIONS

__all__ = ["Family", "Option", "activation_option", "families", "family_table", "get_family", "register"]


@dataclass(frozen=True)
class Option:
    """A constructor keyword of a family, as spec strings give it.

    Attributes:
        key: The constructor's keyword.
        parse: Turns the text after ``=`` into the value (raises ``ValueError`` on bad text).
        aliases: Other spellings of the key in specs (``m`` for ``hidden``).
        words: Bare words that set this option to themselves (activation names, Sylvester kinds).
    """

    key: str
    parse: Callable[[str], Any]
    aliases: tuple[str, ...] = ()
    words: Collection[str] = ()


def _activation(text: str) -> str:
    if text not in ACTIVATIONS:
        raise ValueError(f"unknown activation {text!r}")
    return text


def activation_option() -> Option:
    """The ``activation`` option (``act=`` or a bare activation name)."""
    return Option("activation", _activation, aliases=("act",), words=tuple(ACTIVATIONS))


def choice(*values: str) -> Callable[[str], str]:
    """A parser accepting exactly ``values``."""

    def parse(text: str) -> str:
        if text not in values:
            raise ValueError(f"expected one of {', '.join(values)}, got {text!r}")
        return text

    return parse


@dataclass(frozen=True)
class Family:
    """A registered layer family.

    Attributes:
        name: The family's name in spec strings.
        cls: The :class:`~flowprobe.layers.base.FlowLayer` subclass; built as
            ``cls(dim, layers=K, ensemble=E, **options)``.
        options: The spec options.
        formula: One layer's map in one line (documentation table).
        inverse: How the inverse is computed, in one line (documentation table).
        examples: ``examples(dim) -> {case name: constructor keywords}``: configurations the
            generic layer tests run (every activation, kind, …).
        guaranteed: Whether every raw parameter value gives an invertible layer (the
            reparametrisation enforces it); ``False`` for families that only certify it.
    """

    name: str
    cls: type
    options: tuple[Option, ...] = ()
    formula: str = ""
    inverse: str = ""
    examples: Callable[[int], dict[str, dict[str, Any]]] = field(default=lambda dim: {})
    guaranteed: bool = True

    def option(self, token: str) -> tuple[str, Any]:
        """``(key, value)`` of a spec token: a bare word or ``key=value``.

        Raises:
            ValueError: an unknown word or key, or a bad value.
        """
        if "=" not in token:
            for opt in self.options:
                if token in opt.words:
                    return opt.key, token
            words = sorted({w for opt in self.options for w in opt.words})
            hint = f"a word ({', '.join(words)}) or key=value" if words else "key=value"
            raise ValueError(f"unknown option {token!r} for {self.name} layers; expected {hint}")
        key, text = token.split("=", 1)
        for opt in self.options:
            if key == opt.key or key in opt.aliases:
                try:
                    return opt.key, opt.parse(text)
                except ValueError as err:
                    raise ValueError(f"bad value in {token!r}: {err}") from None
        keys = ", ".join(k for opt in self.options for k in (opt.key, *opt.aliases))
        raise ValueError(f"option {key!r} does not apply to {self.name} layers (keys: {keys or 'none'})")


_FAMILIES: dict[str, Family] = {}

T = TypeVar("T", bound=type)


def register(
    name: str,
    *,
    options: tuple[Option, ...] = (),
    formula: str = "",
    inverse: str = "",
    examples: Callable[[int], dict[str, dict[str, Any]]] | None = None,
    guaranteed: bool = True,
) -> Callable[[T], T]:
    """Class decorator registering a layer family under ``name`` (sets ``cls.family``).

    Raises:
        ValueError: ``name`` is taken by another class.
    """

    def decorate(cls: T) -> T:
        known = _FAMILIES.get(name)
        if known is not None and known.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"layer family {name!r} is already registered by {known.cls.__qualname__}")
        cls.family = name  # type: ignore[attr-defined]
        _FAMILIES[name] = Family(name, cls, tuple(options), formula, inverse, examples or (lambda dim: {}), guaranteed)
        return cls

    return decorate


def families() -> dict[str, Family]:
    """Every registered family by name (built-ins first, in registration order)."""
    import flowprobe.layers  # noqa: F401  (registers the built-in families)

    return dict(_FAMILIES)


def get_family(name: str) -> Family:
    """The family called ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    known = families()
    if name not in known:
        raise ValueError(f"unknown layer family {name!r}; expected one of: {', '.join(known)}")
    return known[name]


def family_table() -> str:
    """The Markdown table of every registered family: spec name, class, formula, inverse, options."""
    rows = ["| spec | class | one layer | inverse | options |", "|---|---|---|---|---|"]
    for fam in families().values():
        keys = ", ".join(f"`{opt.key}`" for opt in fam.options) or "–"
        rows.append(f"| `{fam.name}` | `{fam.cls.__name__}` | `{fam.formula}` | {fam.inverse} | {keys} |")
    return "\n".join(rows)
