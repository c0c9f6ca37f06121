r"""Measuring the minimum depth :math:`T_\varepsilon`: train flows at given depths, bracket, sweep.

One *configuration* is a family, a pair ``(q, p)``, a dimension, a depth, ``ε`` and training
settings. :func:`measure_depth` trains its seeds as **one ensemble** (``E`` flows in the same ops,
each exactly as if trained alone; :func:`flowprobe.fit`) by maximum likelihood on draws of ``p``,
then estimates every member's ``TV(f#q, p)`` with :func:`~flowprobe.theory.tv.tv_combined` and its
empirical-Bernstein interval at level ``1 − (1 − level)/E`` (Bonferroni over the members, so that
"some member reached ``ε``" holds at ``level``). A depth is *reached* when some member's interval
upper end is ``≤ ε``.

Sweeps (:mod:`flowprobe.sweep`): each configuration is one run of :func:`depth_run` keyed by its
parameters, recorded in a SQLite store; :func:`householder_sweep`, :func:`planar_sweep` and
:func:`pair_sweep` define the two constructions of ``docs/theory/depth.md`` §4 and a user's pair;
:func:`brackets` turns a store's rows into brackets (no code is imported from a store: the lower
bound is part of each run's result).

References:
    Z. Kong, K. Chaudhuri. The Expressive Power of a Class of Normalizing Flow Models.
    AISTATS 2020. https://arxiv.org/abs/2006.00392
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from flowprobe.distributions import Density
from flowprobe.flow import Flow
from flowprobe.layers import FlowLayer
from flowprobe.layers.base import MAX_RAW_VALUES
from flowprobe.spec import MAX_LAYERS, build_layers, parse_spec
from flowprobe.sweep import SEED_PARAM, Sweep
from flowprobe.theory.depth import Bracket, DepthOutcome, DepthTheory, bracket, depth_theory
from flowprobe.theory.depth_pairs import DTYPES, Pair, load_pair, pin_spec
from flowprobe.theory.tv import CHUNK, tv_combined
from flowprobe.train import fit
from flowprobe.validation import check_memory

__all__ = [
    "MAX_MEMBERS",
    "RUN_FUNCTION",
    "BestBracket",
    "ConfigurationBracket",
    "Training",
    "brackets",
    "check_family",
    "check_sizes",
    "depth_run",
    "family_spec",
    "householder_sweep",
    "measure_depth",
    "pair_sweep",
    "planar_sweep",
    "seeded_ensemble",
    "theory_of",
    "train_members",
]

RUN_FUNCTION = "flowprobe.theory.depth_experiments:depth_run"
MAX_MEMBERS = 256
_BYTES_PER_VALUE = 8 * 6  # float64 points, log-densities and a few intermediates per value, generously


@dataclasses.dataclass(frozen=True)
class Training:
    """How each configuration is trained and measured (part of every run's parameters).

    Attributes:
        steps: Adam steps of :func:`flowprobe.fit` (cosine schedule, 10 % validation split, best weights).
        lr: Peak learning rate.
        batch_size: Points per step.
        train_samples: Draws of ``p`` to train on (maximum likelihood, through the flow's inverse).
        tv_samples: Draws per side for each member's TV estimate.
        level: Confidence level of the statement "some member reached ``ε``".
        dtype: ``float64`` or ``float32`` (the built-in densities and the flows; a user's file keeps its own).
    """

    steps: int = 1000
    lr: float = 0.05
    batch_size: int = 256
    train_samples: int = 8192
    tv_samples: int = 20_000
    level: float = 0.95
    dtype: str = "float64"

    def __post_init__(self) -> None:
        for name, low, high in (("steps", 1, 10**7), ("batch_size", 1, 10**7), ("train_samples", 16, 10**8),
                                ("tv_samples", 2, 10**9)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if not (isinstance(self.lr, float | int) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.level, float) and 0 < self.level < 1):
            raise ValueError(f"level must lie in (0, 1), got {self.level!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def params(self) -> dict[str, Any]:
        """The settings as sweep parameters."""
        return dataclasses.asdict(self)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Training:
        """The settings recorded in a run's parameters."""
        return cls(**{f.name: params[f.name] for f in dataclasses.fields(cls)})


# -- families -----------------------------------------------------------------------------------


def family_spec(family: str, depth: int) -> str:
    """The flow spec of ``depth`` layers of ``family`` (a spec term without its count):
    ``family_spec("planar:tanh:umax=1", 3) == "planar:3:tanh:umax=1"``."""
    name, _, options = family.partition(":")
    return f"{name}:{depth}" + (f":{options}" if options else "")


def check_family(family: str) -> None:
    """Raise a one-line ``ValueError`` unless ``family`` is one spec term without a layer count."""
    if not isinstance(family, str) or not family.strip() or "+" in family:
        raise ValueError(f"a family is one spec term without a layer count (e.g. householder, planar:tanh:umax=1), "
                         f"got {family!r}")
    head = family.split(":")
    if len(head) > 1 and head[1].isdigit():
        raise ValueError(f"give the family without a layer count (the depth is swept), e.g. "
                         f"{':'.join(head[:1] + head[2:])!r} instead of {family!r}")
    parse_spec(family_spec(family, 1))


def _layer(family: str, dim: int) -> FlowLayer:
    return build_layers(family_spec(family, 1), dim)[0]


def theory_of(family: str, pair: Pair) -> DepthTheory | None:
    """The proven floor for flows of ``family`` on ``pair`` (:func:`~flowprobe.theory.depth.depth_theory`)."""
    check_family(family)
    return depth_theory(_layer(family, pair.dim), pair.source_form, pair.target_form)


# -- one configuration --------------------------------------------------------------------------


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not 1 <= len(seeds) <= MAX_MEMBERS:
        raise ValueError(f"give between 1 and {MAX_MEMBERS} seeds, got {len(seeds)}")
    if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63 for s in seeds):
        raise ValueError(f"seeds must be integers in [0, 2**63), got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must differ, got {seeds}")
    return seeds


def check_sizes(family: str, dim: int, depth: int, members: int, training: Training,
                device: torch.device | str = "cpu") -> None:
    """Refuse a configuration whose flows, training data and TV draws cannot fit in the memory available now
    (the parameters count four times: values, gradients and Adam's two moments).

    Raises:
        ValueError: naming the estimate and what is available, or too many parameters.
    """
    parameters = members * depth * _layer(family, dim).raw_numel
    if parameters > MAX_RAW_VALUES:
        raise ValueError(f"{members} flows of {depth} layers of {family} in dimension {dim} have {parameters:.3g} "
                         f"parameters, more than {MAX_RAW_VALUES:.0e}")
    points = dim * (training.train_samples + members * min(training.tv_samples, CHUNK) + CHUNK)
    check_memory(points * _BYTES_PER_VALUE + 4 * parameters * 8, f"{members} flows of {depth} layers in dimension "
                 f"{dim} with {training.train_samples} training and {min(training.tv_samples, CHUNK)} TV points at a "
                 "time", device)


def seeded_ensemble(spec: str, base: Density, seeds: Sequence[int]) -> Flow:
    """An ensemble flow on ``base`` whose member ``i`` has the initial values of ``Flow(base,
    build_layers(spec, d))`` built right after ``torch.manual_seed(seeds[i])``, in ``base``'s dtype and device.

    (:func:`~flowprobe.build_flow` with ``ensemble=E`` draws the members one after the other from one
    generator instead; this one makes every member reproducible on its own.) Leaves torch's global
    generator changed.
    """
    seeds = _check_seeds(seeds)
    flow = Flow(base, build_layers(spec, base.dim, ensemble=len(seeds))).to(base.anchor)
    with torch.no_grad():
        for i, seed in enumerate(seeds):
            torch.manual_seed(seed)
            for stack, solo in zip(flow.stacks, build_layers(spec, base.dim), strict=True):
                for name, value in solo.named_parameters(recurse=False):
                    getattr(stack, name)[i].copy_(value)
    return flow


def train_members(family: str, pair: Pair, depth: int, seeds: Sequence[int], data: torch.Tensor,
                  training: Training) -> tuple[Flow, list[Any]]:
    """An ensemble of ``depth`` layers of ``family`` on ``pair.source``, one member per seed, trained on ``data``.

    Member ``i`` is initialised from ``torch.manual_seed(seeds[i])`` and trained with ``seed=seeds[i]``, so it
    equals the flow ``Flow(pair.source, build_layers(spec, d))`` built after that seed and trained alone on
    the same data. A member whose training diverged is reset to its initial values, so that the ensemble
    can still be evaluated (its numbers are not to be reported). Uses (and leaves changed) torch's global
    generator.

    Returns:
        The ensemble flow and one :class:`~flowprobe.train.History` per member.
    """
    flow = seeded_ensemble(family_spec(family, depth), pair.source, seeds)
    initial = [p.detach().clone() for p in flow.parameters()]
    histories = fit(flow, data=data, seeds=seeds, steps=training.steps, lr=training.lr,
                    batch_size=training.batch_size, log_every=max(1, min(50, training.steps)))
    with torch.no_grad():  # a diverged member may hold non-finite values: back to its start, never reported
        for i, history in enumerate(histories):
            if history.failed is not None:
                for param, start in zip(flow.parameters(), initial, strict=True):
                    param[i].copy_(start[i])
    return flow, histories


def _status(members: list[dict[str, Any]], eps: float) -> str:
    trained = [m for m in members if m["failed"] is None]
    if not trained:
        return "failed"
    if any(m["high"] <= eps for m in trained):
        return "reached"
    return "above" if all(m["low"] > eps for m in trained) else "inconclusive"


def measure_depth(family: str, pair: Pair, depth: int, seeds: Sequence[int], eps: float,
                  training: Training = Training(), seed: int = 0) -> dict[str, Any]:  # noqa: B008
    """Train ``len(seeds)`` flows of ``depth`` layers as one ensemble and measure each one's TV to the target.

    Depth 0 is the source itself (nothing to train). ``seed`` fixes the training draws of ``p`` and the
    TV draws; torch's global generator is restored afterwards.

    Returns:
        JSON-ready: ``depth``, ``eps``, ``status`` (``reached`` / ``above`` / ``inconclusive`` / ``failed``,
        see :class:`~flowprobe.theory.depth.DepthOutcome`), ``best_high``, ``interval_level`` (per member),
        ``members`` (``seed``, ``tv``, ``low``, ``high``, ``failed``, ``final_loss``, ``steps``), and the
        theory where one applies: ``lower_bound`` (``T_ε ≥``), ``bound`` (real-valued), ``floor`` (TV floor
        at this depth), ``theory`` (its statement); ``None`` otherwise.

    Raises:
        ValueError: a bad family, depth, seed list, ``ε`` or size; every member diverged.
    """
    if not (isinstance(eps, float) and 0 < eps < 1):
        raise ValueError(f"ε must lie in (0, 1), got {eps!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= MAX_LAYERS:
        raise ValueError(f"depth must be an integer in [0, {MAX_LAYERS}], got {depth!r}")
    seeds = _check_seeds(seeds)
    theory = theory_of(family, pair)
    anchor = pair.source.anchor
    check_sizes(family, pair.dim, depth, len(seeds), training, anchor.device)
    devices = [anchor.device] if anchor.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if depth == 0:
            torch.manual_seed(seed)
            level = training.level
            tv = tv_combined(pair.source, pair.target, training.tv_samples, level=level)
            members = [{"seed": None, "failed": None, "final_loss": None, "steps": 0, **_tv(tv, None)}]
        else:
            torch.manual_seed(seed)
            data = pair.target.sample(training.train_samples)
            flow, histories = train_members(family, pair, depth, seeds, data, training)
            level = 1 - (1 - training.level) / len(seeds)
            tv = tv_combined(flow, pair.target, training.tv_samples, level=level)
            members = [{"seed": s, "failed": h.failed, "final_loss": None if h.failed else h.final_loss,
                        "steps": h.steps_done, **_tv(tv, i if h.failed is None else -1)}
                       for i, (s, h) in enumerate(zip(seeds, histories, strict=True))]
    status = _status(members, eps)
    highs = [m["high"] for m in members if m["failed"] is None]
    return {
        "dim": pair.dim,
        "depth": depth,
        "eps": eps,
        "status": status,
        "best_high": min(highs) if highs else None,
        "interval_level": level,
        "members": members,
        "lower_bound": None if theory is None else theory.lower_bound(eps),
        "bound": None if theory is None else theory.real_bound(eps),
        "floor": None if theory is None else theory.floor(depth),
        "theory": None if theory is None else theory.statement,
    }


def _tv(estimate: Any, index: int | None) -> dict[str, float | None]:
    """Member ``index``'s TV numbers (``None`` for all of the batch's scalars, ``-1`` for a failed member)."""
    if index == -1:
        return {"tv": None, "low": None, "high": None}
    pick = (lambda t: float(t)) if index is None else (lambda t: float(t[index]))
    return {"tv": pick(estimate.estimate), "low": pick(estimate.low), "high": pick(estimate.high)}


def depth_run(params: dict[str, Any]) -> dict[str, Any]:
    """The sweep run function: one configuration, from its parameters (``family``, ``source``, ``target``,
    ``d``, ``depth``, ``eps``, ``seeds`` and the :class:`Training` fields; the run's seed fixes the draws).

    A pinned file spec is checked against its SHA-256 before the file is imported.
    """
    training = Training.from_params(params)
    pair = load_pair(params["source"], params["target"], params["d"], DTYPES[training.dtype])
    return measure_depth(params["family"], pair, params["depth"], params["seeds"], params["eps"], training,
                         params.get(SEED_PARAM, 0))


# -- sweeps -------------------------------------------------------------------------------------


def _fixed(family: str, eps: float, seeds: Sequence[int], training: Training, **more: Any) -> dict[str, Any]:
    check_family(family)
    if not (isinstance(eps, float) and 0 < eps < 1):
        raise ValueError(f"ε must lie in (0, 1), got {eps!r}")
    return {"family": family, "eps": eps, "seeds": _check_seeds(seeds), **training.params(), **more}


def _around(lower: int, below: int = 1, above: int = 2) -> list[int]:
    """Depths ``lower − below … lower + above`` (not below 0): a depth the theory rules out, then upwards."""
    return list(range(max(lower - below, 0), lower + above + 1))


def _check_dims(dims: Sequence[int], even: bool = False) -> list[int]:
    dims = list(dims)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 or (even and d % 2) for d in dims):
        kind = "positive even integers" if even else "positive integers"
        raise ValueError(f"dimensions must be {kind}, got {dims}")
    return dims


def _check_depths(depths: Sequence[int]) -> list[int]:
    depths = sorted(set(depths))
    if not depths or any(isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_LAYERS for n in depths):
        raise ValueError(f"depths must be integers in [0, {MAX_LAYERS}], got {list(depths)}")
    return depths


def householder_sweep(dims: Sequence[int] = (2, 4, 6, 8), eps: float = 0.1, seeds: Sequence[int] = (0, 1, 2, 3),
                      training: Training = Training(), depths: Sequence[int] | None = None) -> Sweep:  # noqa: B008
    """The Householder construction (``halves:2:1 → halves:1:2``, one reflection per layer) for each ``d``,
    at depths ``d/2 − 1, d/2, d/2 + 1`` (or ``depths``): ``T_ε = d/2`` for ``ε < 0.166064``."""
    dims = _check_dims(dims, even=True)
    grids = [{"d": [d], "depth": _check_depths(depths) if depths is not None else _around(d // 2, 1, 1)} for d in dims]
    fixed = _fixed("householder", eps, seeds, training, source="halves:2:1", target="halves:1:2", series="householder")
    return Sweep("depth-householder", RUN_FUNCTION, grids, fixed)


def planar_sweep(dims: Sequence[int] = (2, 4, 8, 16), kappas: Sequence[float] = (0.5, 1.0), eps: float = 0.1,
                 seeds: Sequence[int] = (0, 1, 2, 3), training: Training = Training(),  # noqa: B008
                 u_max: float = 1.0, activation: str = "tanh", depths: Sequence[int] | None = None) -> Sweep:
    """The bounded-planar construction ``N(0, I) → N(R e₁, I)``, ``R = d^κ``, for each ``κ`` and ``d``, at the
    depths ``⌈bound⌉ − 1 … ⌈bound⌉ + 2`` around the proven lower bound (or ``depths``)."""
    dims = _check_dims(dims)
    if not kappas or any(not (isinstance(k, float | int) and 0 < k <= 4) for k in kappas):
        raise ValueError(f"κ must be numbers in (0, 4], got {list(kappas)}")
    family = f"planar:{activation}:umax={float(u_max)!r}"
    fixed = _fixed(family, eps, seeds, training, source="normal")
    grids = []
    for kappa in kappas:
        for d in dims:
            target = f"shift:{float(d ** kappa)!r}"
            if depths is None:
                theory = theory_of(family, load_pair("normal", target, d, DTYPES[training.dtype]))
                assert theory is not None  # bounded planar on one covariance: the displacement floor applies
                chosen = _around(theory.lower_bound(eps))
            else:
                chosen = _check_depths(depths)
            grids.append({"d": [d], "depth": chosen, "target": [target], "series": [f"κ={float(kappa):g}"]})
    return Sweep("depth-planar", RUN_FUNCTION, grids, fixed)


def pair_sweep(family: str, source: str, target: str, dim: int | None, depths: Sequence[int] | None = None,
               eps: float = 0.1, seeds: Sequence[int] = (0, 1, 2, 3),
               training: Training = Training()) -> Sweep:  # noqa: B008
    """A user's pair: ``depths`` of ``family`` (default: around the proven lower bound, if one applies).

    File specs are pinned (absolute path and SHA-256, :func:`~flowprobe.theory.depth_pairs.pin_spec`), so
    every run imports the same code, from any working directory.

    Raises:
        ValueError: bad arguments; no ``depths`` and no lower bound to centre them on.
        FileNotFoundError: a named file does not exist.
    """
    source, target = pin_spec(source), pin_spec(target)
    pair = load_pair(source, target, dim, DTYPES[training.dtype])
    theory = theory_of(family, pair)
    if depths is None:
        if theory is None:
            raise ValueError("no lower bound is proven for this family and pair: give the depths to try")
        depths = _around(theory.lower_bound(eps))
    fixed = _fixed(family, eps, seeds, training, source=source, target=target, d=pair.dim, series=family)
    return Sweep("depth-pair", RUN_FUNCTION, {"depth": _check_depths(depths)}, fixed)


# -- brackets from rows -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConfigurationBracket:
    """The bracket of one configuration (all its parameters but the depth).

    Attributes:
        params: The configuration's parameters (without ``depth``).
        bracket: ``lower ≤ T_ε ≤ upper``.
        bound: The real-valued lower bound (``None`` without theory).
        theory: The theorem's statement (``None`` without theory).
        rows: The store rows of its depths, in increasing depth.
    """

    params: dict[str, Any]
    bracket: Bracket
    bound: float | None
    theory: str | None
    rows: list[dict[str, Any]]

    @property
    def label(self) -> str:
        """``series d=D`` (or ``family d=D``)."""
        return f"{self.params.get('series', self.params.get('family'))} d={self.params.get('d')}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: parameters, bracket, bound and every depth's run."""
        eps = self.params["eps"]
        runs = [{"depth": r["params"]["depth"], "status": r["status"], "error": r["error"], "result": r["result"]}
                for r in self.rows]
        return {"label": self.label, "params": self.params, "bracket": self.bracket.to_dict(eps), "bound": self.bound,
                "theory": self.theory, "runs": runs}


def _configuration(params: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in params.items() if k != "depth"}, sort_keys=True)


def outcome_of(row: Mapping[str, Any]) -> DepthOutcome:
    """What a store row says about its depth."""
    depth = row["params"]["depth"]
    if row["status"] != "ok":
        return DepthOutcome(depth, "failed", note=row["error"])
    result = row["result"]
    return DepthOutcome(depth, result["status"], result["best_high"])


def brackets(rows: Sequence[Mapping[str, Any]]) -> list[ConfigurationBracket]:
    """Group the rows of depth runs by configuration and bracket each (rows of other functions are skipped).

    Groups are ordered by series, then dimension, then the rest of the parameters.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        params = row["params"]
        if not isinstance(params, Mapping) or not {"family", "depth", "eps", "seeds"} <= params.keys():
            continue
        groups.setdefault(_configuration(params), []).append(row)
    out = []
    for key, members in groups.items():
        members = sorted(members, key=lambda r: r["params"]["depth"])
        ok = [r["result"] for r in members if r["status"] == "ok"]
        first = ok[0] if ok else {}
        out.append(ConfigurationBracket(json.loads(key), bracket([outcome_of(r) for r in members],
                                        first.get("lower_bound")), first.get("bound"), first.get("theory"),
                                        [dict(r) for r in members]))
    return sorted(out, key=lambda c: (str(c.params.get("series")), c.params.get("d") or 0, _configuration(c.params)))


class BestBracket:
    """The ``best`` callback of :func:`~flowprobe.sweep.run_sweep`: the latest configuration's bracket on the
    progress line, with the number of closed brackets."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, Any]] = {}

    def __call__(self, row: dict[str, Any]) -> str | None:
        if "family" not in row["params"]:
            return None
        self._rows[row["key"]] = row
        found = brackets(list(self._rows.values()))
        current = next(c for c in found if _configuration(c.params) == _configuration(row["params"]))
        closed = sum(c.bracket.closed for c in found)
        return f"{current.label}: T_ε ∈ {current.bracket.text()} ({closed}/{len(found)} closed)"
