"""What a sweep is: a named grid of independent runs, each keyed by its parameters' canonical JSON.

A run's key is ``json.dumps(params, sort_keys=True, separators=(",", ":"))``, so the same parameters
give the same key whatever their order or the process that built them, and its seed is a hash of
that key (and of the sweep's ``seed``): every executor hands a run the same seed.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_RUNS", "SEED_PARAM", "Run", "Sweep", "canonical_key", "check_fn", "derive_seed", "resolve_fn"]

MAX_RUNS = 100_000
"""Default ceiling on a sweep's size, checked before any run is built."""

SEED_PARAM = "_seed"
"""The name under which a run function finds its run's seed in ``params``; not part of the key."""

_FN_SPEC = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*")


@dataclass(frozen=True)
class Run:
    """One run of a sweep.

    Attributes:
        key: the canonical JSON of ``params``; the run's identity in a store.
        params: the parameters, as the run function receives them (plus ``SEED_PARAM``).
        seed: the run's seed, ``derive_seed(key, sweep.seed)``.
    """

    key: str
    params: dict[str, Any]
    seed: int


def _check_json(value: Any, where: str) -> None:
    """Raise ValueError unless ``value`` is a JSON value that survives a round trip unchanged."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value!r}: parameters must be finite numbers")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for name, item in value.items():
            if not isinstance(name, str):
                raise ValueError(f"{where} has the key {name!r}: JSON object keys must be strings")
            _check_json(item, f"{where}[{name!r}]")
        return
    hint = " (use a list)" if isinstance(value, tuple) else ""
    raise ValueError(f"{where} is a {type(value).__name__}, not a JSON value{hint}")


def canonical_key(params: Mapping[str, Any]) -> str:
    """The canonical JSON text of a run's parameters: sorted keys, no spaces, finite numbers only.

    Raises:
        ValueError: a value that is not JSON (a tuple, a tensor, a set, NaN, a non-string key …).
    """
    params = dict(params)
    _check_json(params, "params")
    return json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def derive_seed(key: str, salt: int = 0) -> int:
    """A run's seed: the first 63 bits of SHA-256 of ``"{salt}\\n{key}"`` (a non-negative int64)."""
    digest = hashlib.sha256(f"{salt}\n{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def check_fn(fn: str) -> None:
    """Raise ValueError unless ``fn`` reads ``"package.module:function"``."""
    if not isinstance(fn, str) or not _FN_SPEC.fullmatch(fn):
        raise ValueError(f"run function must be given as 'package.module:function', got {fn!r}")


def resolve_fn(fn: str) -> Callable[[dict[str, Any]], Any]:
    """Import the run function named ``"package.module:function"``.

    Raises:
        ValueError: a malformed name, a module that fails to import, or a missing or non-callable attribute.
    """
    check_fn(fn)
    module_name, _, name = fn.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's module failed: one line
        raise ValueError(f"cannot import the run function {fn!r}: {type(err).__name__}: {err}") from None
    target = getattr(module, name, None)
    if not callable(target):
        raise ValueError(f"module {module_name!r} has no function {name!r}")
    return target


def _axes(grid: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any]) -> list[tuple[str, list[Any]]]:
    """The checked axes of one product grid, in the given order."""
    if not isinstance(grid, Mapping):
        raise ValueError(f"a grid is a mapping axis -> list of values, got {type(grid).__name__}")
    axes = []
    for name, values in grid.items():
        if not isinstance(name, str) or not name or name.startswith("_"):
            raise ValueError(f"axis names are non-empty strings not starting with '_', got {name!r}")
        if name in fixed:
            raise ValueError(f"{name!r} is both a grid axis and a fixed parameter")
        if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, range)):
            raise ValueError(f"axis {name!r} needs a list of values, got {type(values).__name__}")
        if len(values) == 0:
            raise ValueError(f"axis {name!r} has no values: the grid would be empty")
        axes.append((name, list(values)))
    return axes


@dataclass(frozen=True)
class Sweep:
    """A named grid of independent runs of one run function.

    The runs are the Cartesian product of ``grid``'s axes (or the union of the products when ``grid``
    is a list of grids, for shapes a single product cannot express, such as depths that depend on
    ``d``), each merged with ``fixed``. Runs that coincide are kept once.

    The run function is a top-level function importable by name in every worker, e.g.
    ``"mypackage.experiments:train_one"``; it is called as ``fn(params)`` with the run's parameters
    plus ``params["_seed"]`` (the run's seed) and must return a dict of JSON values.

    Attributes:
        name: the sweep's name, recorded in its store (a store refuses another sweep's runs).
        fn: the run function, ``"package.module:function"``.
        grid: ``{axis: [values]}`` or a list of such grids.
        fixed: parameters shared by every run (part of every key).
        seed: salt of every run's seed; change it to redraw all seeds.
        max_runs: refuse grids larger than this, before building them.

    Raises:
        ValueError: an empty or malformed name, function or grid, a non-JSON parameter, or a grid of more
            than ``max_runs`` runs.
    """

    name: str
    fn: str
    grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Sequence[Any]]]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    max_runs: int = MAX_RUNS
    runs: tuple[Run, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a sweep needs a non-empty name, got {self.name!r}")
        check_fn(self.fn)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if isinstance(self.max_runs, bool) or not isinstance(self.max_runs, int) or self.max_runs < 1:
            raise ValueError(f"max_runs must be a positive int, got {self.max_runs!r}")
        if not isinstance(self.fixed, Mapping):
            raise ValueError(f"fixed must be a mapping name -> value, got {type(self.fixed).__name__}")
        for name in self.fixed:
            if not isinstance(name, str) or not name or name.startswith("_"):
                raise ValueError(f"parameter names are non-empty strings not starting with '_', got {name!r}")
        grids = [self.grid] if isinstance(self.grid, Mapping) else list(self.grid)
        if not grids:
            raise ValueError("a sweep needs at least one grid")
        products = [_axes(grid, self.fixed) for grid in grids]
        size = sum(math.prod(len(values) for _, values in axes) for axes in products)
        if size > self.max_runs:
            shapes = " + ".join("×".join(str(len(v)) for _, v in axes) or "1" for axes in products)
            raise ValueError(f"sweep {self.name!r} has {size} runs ({shapes}), more than max_runs={self.max_runs}")
        runs: dict[str, Run] = {}
        for axes in products:
            names = [name for name, _ in axes]
            for values in itertools.product(*(values for _, values in axes)):
                params = {**self.fixed, **dict(zip(names, values))}
                key = canonical_key(params)
                if key not in runs:
                    runs[key] = Run(key, json.loads(key), derive_seed(key, self.seed))
        object.__setattr__(self, "runs", tuple(runs.values()))

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs)

    def definition(self) -> dict[str, Any]:
        """What a store records of this sweep: its identity (name, function, seed) and its grid."""
        grids = [self.grid] if isinstance(self.grid, Mapping) else list(self.grid)
        grid = [{name: list(values) for name, values in g.items()} for g in grids]
        return {"name": self.name, "fn": self.fn, "seed": self.seed, "grid": grid, "fixed": dict(self.fixed)}
