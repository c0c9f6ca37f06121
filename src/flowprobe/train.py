"""Training: maximum likelihood on samples, or reverse KL to an unnormalised density.

* ``fit(flow, data=x)`` minimises the negative log-likelihood ``−E_data[log q(x)]/dim`` through the
  flow's exact inverse, with a validation split, early stopping and the best weights restored.
* ``fit(flow, energy=U)`` minimises the reverse KL up to a constant,
  ``E_{x~q}[log q(x) + U(x)] = KL(q‖p) − log Z`` for ``p = exp(−U)/Z`` (Rezende & Mohamed 2015,
  eq. 15), with reparametrised samples from the forward direction only.

Optimiser: Adam with a cosine (default) or constant learning rate and optional gradient-norm
clipping. Every random draw (mini-batch indices, source noise) comes from one ``torch.Generator``
that is checkpointed with the weights and Adam's moments, so ``fit(..., resume=True)`` continues a
killed run exactly: same seed and same checkpoint boundaries give bit-identical final weights.

Output directory (``out``, a :class:`~flowprobe.rundir.RunWriter`, locked for the whole call):
``config.json`` (settings, flow spec, target, run id), ``history.jsonl`` (one JSON record per
``log_every`` steps), ``checkpoint.json`` + ``checkpoint-<step>.safetensors`` (the last checkpoint:
the JSON is written last, carries the SHA-256 of the tensor file and a checksum of itself, and
records the configuration and the flow's outputs at fixed probe points, so a resume with another
spec, other settings or a damaged file is refused) and ``weights.safetensors`` (the final flow).
A new run is staged until its first checkpoint; an existing directory is refused unless the call
resumes or overwrites it, and files flowprobe did not write are never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowprobe.distributions import Energy
from flowprobe.flow import Flow
from flowprobe.io import CorruptFileError, load_state
from flowprobe.layers import native
from flowprobe.rundir import RunWriter, check_probe, new_run_id, probe_outputs
from flowprobe.sources import initialise
from flowprobe.validation import check_memory, check_points, validation

__all__ = [
    "FitConfig",
    "History",
    "fit",
    "split_data",
    "split_indices",
]

SCHEDULES = ("cosine", "constant")
# Runs at least this long build the compiled run kernels if they are missing (``layers/native.py``):
# the build (~40 s on 2 cores, once per machine) then costs less than the per-step time it saves
# (benchmarks/whole_run.py, planar K = 32 on U1, 20 000 steps: 100.0 s eager, 73.0 s building first).
NATIVE_BUILD_STEPS = 20_000
CHECKPOINT_FORMAT = 2


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Optimiser and loop settings (the defaults reach KL ≤ 0.03 on U1 with planar K = 32).

    Attributes:
        steps: Number of Adam steps.
        lr: Peak learning rate.
        batch_size: Points per step (data mini-batch or samples from ``q``).
        schedule: ``cosine`` (decay to 0 over ``steps``) or ``constant``.
        clip: Maximal gradient norm (``None``: no clipping; the norm is recorded either way).
        val_fraction: Share of the data held out for validation (data only).
        patience: Stop after this many validations without improvement (``None``: never).
        log_every: Steps between history records (and validations).
        checkpoint_every: Steps between checkpoints (``None``: none; needs ``out``).
        seed: Seed of the training generator and of the validation split.
        anneal: Reverse KL only: the share of the steps over which the inverse temperature β of
            ``E_q[log q + βU]`` rises linearly from 0.01 to 1, as in Rezende & Mohamed (2015); 0 disables
            it. The default 0.5 keeps reverse KL from settling with a mode under-weighted (U1, planar
            K = 32: without it 2 of 4 seeds ended above KL 0.03).
        init_source: Data only: before the first step, start every layer at the identity map where its
            family has one (:meth:`~flowprobe.layers.base.FlowLayer.start_at_identity`), set the flow's
            Gaussian source to the maximum-likelihood Gaussian of the training split pulled back through
            the layers (:func:`flowprobe.sources.initialise`; each ensemble member from its own split), and
            count that flow as a candidate for the best weights (``best_step = 0``). With identity and
            orthogonal (Householder) layers the starting flow is the data's maximum-likelihood Gaussian.
    """

    steps: int = 20_000
    lr: float = 3e-3
    batch_size: int = 1024
    schedule: str = "cosine"
    clip: float | None = 10.0
    val_fraction: float = 0.1
    patience: int | None = None
    log_every: int = 100
    checkpoint_every: int | None = None
    seed: int = 0
    anneal: float = 0.5
    init_source: bool = False

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "log_every": self.log_every}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, float | int) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of: {', '.join(SCHEDULES)}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip must be positive or None, got {self.clip!r}")
        if not (isinstance(self.anneal, float | int) and 0 <= self.anneal <= 1):
            raise ValueError(f"anneal must be a share of the steps in [0, 1], got {self.anneal!r}")
        if not isinstance(self.init_source, bool):
            raise ValueError(f"init_source must be True or False, got {self.init_source!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie in [0, 1), got {self.val_fraction!r}")
        for name in ("patience", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based): ``lr·½(1 + cos(π step/steps))`` for cosine."""
        if self.schedule == "constant":
            return self.lr
        return self.lr * 0.5 * (1 + math.cos(math.pi * step / self.steps))


@dataclasses.dataclass
class History:
    """What happened during :func:`fit`.

    Attributes:
        records: One dict per ``log_every`` steps: ``step``, ``loss`` (mean over the interval; NLL in
            nats/dim for data, ``E_q[log q + U]`` for an energy),
            ``lr``, ``grad_norm`` (last step) and, with validation data, ``val_nll`` (nats/dim).
        best_step: Step of the best validation NLL (data with a validation split), else ``None``.
        best_val_nll: That NLL.
        stopped_early: Whether early stopping ended the run.
        steps_done: Steps taken (less than ``steps`` after early stopping).
        seconds: Wall-clock time of this call.
        train_index: Rows of ``data`` used for training (maximum likelihood), else ``None``.
        val_index: Rows of ``data`` held out for validation, else ``None``.
        failed: Ensemble members only: why this member stopped training (a diverged loss), else ``None``.
    """

    records: list[dict[str, float]] = dataclasses.field(default_factory=list)
    best_step: int | None = None
    best_val_nll: float | None = None
    stopped_early: bool = False
    steps_done: int = 0
    seconds: float = 0.0
    train_index: Tensor | None = None
    val_index: Tensor | None = None
    failed: str | None = None

    @property
    def final_loss(self) -> float:
        """The loss of the last record."""
        return self.records[-1]["loss"] if self.records else math.nan

    def summary(self) -> dict[str, Any]:
        """Everything except the records and the split, JSON-ready."""
        skip = ("records", "train_index", "val_index")
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        return fields | {"final_loss": self.final_loss}


# -- data -----------------------------------------------------------------------------------------


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor | None]:
    """Row indices ``(train, validation)`` of a random split of ``n`` rows, reproducible from ``seed``;
    no validation rows if the share rounds to 0.

    Raises:
        ValueError: the split leaves no training rows.
    """
    n_val = int(round(val_fraction * n))
    if n_val == 0:
        return torch.arange(n), None
    if n_val >= n:
        raise ValueError(f"validation split of {val_fraction} leaves no training points out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed), device="cpu")
    return perm[n_val:], perm[:n_val]


def split_data(x: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor | None]:
    """Random ``(train, validation)`` split of the rows of ``x`` (:func:`split_indices`)."""
    train, val = split_indices(x.shape[0], val_fraction, seed)
    return x[train.to(x.device)], (None if val is None else x[val.to(x.device)])


# -- the loop -------------------------------------------------------------------------------------


def fit(
    flow: Flow,
    data: Tensor | None = None,
    energy: Energy | None = None,
    config: FitConfig | None = None,
    *,
    out: str | Path | RunWriter | None = None,
    resume: bool = False,
    overwrite: bool = False,
    callback: Callable[[dict[str, float]], None] | None = None,
    meta: dict[str, Any] | None = None,
    seeds: Sequence[int] | None = None,
    **settings: Any,
) -> History | list[History]:
    """Train ``flow`` in place by maximum likelihood (``data``) or reverse KL (``energy``).

    An ensemble flow (stacks built with ``ensemble=E``) trains its ``E`` members in the same ops,
    each exactly as if it were trained alone with its own seed: its own validation split,
    mini-batches and source noise, gradient clipping, early stopping and best weights, and a member
    whose loss diverges stops alone (its :attr:`History.failed` says why).

    Args:
        flow: The flow to train (its parameters' device and dtype are used throughout).
        data: Training points ``(N, dim)`` (exclusive with ``energy``).
        energy: Target energy ``U`` with ``p ∝ exp(−U)`` (exclusive with ``data``).
        config: A :class:`FitConfig`; keyword ``settings`` (``steps=…``, ``lr=…``) override it.
        out: Directory for ``config.json``, ``history.jsonl``, checkpoints and ``weights.safetensors``,
            or an open :class:`~flowprobe.rundir.RunWriter` (its mode replaces ``resume``/``overwrite``).
            A directory that is not empty is refused unless ``resume`` or ``overwrite``.
        resume: Continue from the checkpoint in ``out`` (the settings and flow must be those of the run).
        overwrite: Replace the run in ``out`` once this one has written its first checkpoint; files
            flowprobe did not write are kept (and a file in the way of the run's own is refused).
        callback: Called with every history record (progress display; ensembles add ``member``).
        meta: Extra JSON-ready facts stored in ``out/config.json`` next to the settings, the flow's
            ``dim`` and ``dtype``: give ``{"flow": spec}`` (the spec string of
            :func:`~flowprobe.build_flow`) so that :func:`~flowprobe.load_run` can rebuild the flow.
            On resume they must equal the run's.
        seeds: Ensembles only: one seed per member (flattened ensemble order); default
            ``config.seed + i`` for member ``i``. Member ``i`` then equals ``fit(flow.member(i),
            seed=seeds[i])``.

    Returns:
        The :class:`History` (a list of them, one per member, for an ensemble), with the
        train/validation split used. With a validation split, the flow ends with its best weights.

    Raises:
        ValueError: bad inputs, a batch that cannot fit in memory, a diverged loss (every member's, for
            an ensemble), or a resume whose settings, flow or files differ from the run's
            (``CorruptFileError`` for damaged checkpoints).
        DirectoryBusyError: another process is writing ``out``.
    """
    if (data is None) == (energy is None):
        raise ValueError("fit needs exactly one of data= (maximum likelihood) or energy= (reverse KL)")
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    config = dataclasses.replace(config or FitConfig(), **settings)
    if config.checkpoint_every is not None and out is None:
        raise ValueError("checkpoint_every needs an output directory (out=...)")
    if resume and out is None:
        raise ValueError("resume needs the output directory of the run (out=...)")
    if config.init_source and data is None:
        raise ValueError("init_source sets the source to the training data's moments: it needs data=")
    seeds = _member_seeds(flow, config, seeds)
    anchor = next(flow.parameters())
    train, val, splits = None, None, [(None, None)] * len(seeds)
    if data is not None:
        data = check_points(data, flow.dim, "data").to(device=anchor.device, dtype=anchor.dtype)
        splits = [split_indices(data.shape[0], config.val_fraction, seed) for seed in seeds]
        train = torch.stack([data[index.to(data.device)] for index, _ in splits])
        val = None if splits[0][1] is None else torch.stack([data[index.to(data.device)] for _, index in splits])
    elif energy.dim != flow.dim:
        raise ValueError(f"energy has dim {energy.dim}, flow has dim {flow.dim}")
    if isinstance(out, RunWriter):
        writer, owned = out, contextlib.nullcontext(out)
    elif out is not None:
        writer = RunWriter(out, "resume" if resume else "overwrite" if overwrite else "new")
        owned = writer
    else:
        writer, owned = None, contextlib.nullcontext()
    if config.steps >= NATIVE_BUILD_STEPS and anchor.device.type == "cpu":
        native.kernels(build=True)  # a long run repays building the compiled run kernels (once per machine)
    loop = _Loop(flow, config, train, val, energy, writer, callback, seeds)
    if config.init_source and not (writer is not None and writer.mode == "resume"):
        for stack in flow.stacks:
            stack.start_at_identity()
        initialise(flow, loop._points(list(train)))
        with validation(False):
            loop.validate_start()
    with validation(False):
        loop.check_memory()
    with owned:
        if writer is not None and writer.mode == "resume":
            loop.restore(meta)
        elif writer is not None:
            loop.start_files(meta or {})
        with validation(False):
            histories = loop.run()
    for history, (train_index, val_index) in zip(histories, splits, strict=True):
        history.train_index, history.val_index = train_index, val_index
    return histories if flow.ensemble_shape else histories[0]


def _member_seeds(flow: Flow, config: FitConfig, seeds: Sequence[int] | None) -> list[int]:
    """One seed per ensemble member (``[config.seed]`` for a flow without ensemble); checks that every
    trainable parameter belongs to the ensemble, so that members cannot influence each other."""
    members = math.prod(flow.ensemble_shape)
    if not flow.ensemble_shape:
        if seeds is not None:
            raise ValueError("seeds= is for ensembles (one per member); give seed= for a single flow")
        return [config.seed]
    shared = [name for name, p in flow.named_parameters() if p.requires_grad
              and tuple(p.shape[: len(flow.ensemble_shape)]) != flow.ensemble_shape]
    shared += [f"stacks.{i}" for i, s in enumerate(flow.stacks) if not s.ensemble_shape and any(
        p.requires_grad for p in s.parameters())]
    if not flow.base.ensemble_shape and any(p.requires_grad for p in flow.base.parameters()):
        shared.append("the source (base)")
    if shared:
        raise ValueError(f"an ensemble trains per-member parameters only; {shared[0]} is shared by every member")
    seeds = [config.seed + i for i in range(members)] if seeds is None else [int(s) for s in seeds]
    if len(seeds) != members:
        raise ValueError(f"seeds must give one seed per ensemble member ({members}), got {len(seeds)}")
    return seeds


class _Loop:
    """State of one training run of ``M ≥ 1`` ensemble members (``M = 1`` for a plain flow); ``run``
    advances it, ``checkpoint``/``restore`` persist it. Everything random or stateful is per member:
    generators, data splits, interval losses, validation, best weights, early stopping."""

    def __init__(
        self,
        flow: Flow,
        config: FitConfig,
        train: Tensor | None,
        val: Tensor | None,
        energy: Energy | None,
        writer: RunWriter | None,
        callback: Callable[[dict[str, float]], None] | None,
        seeds: list[int],
    ) -> None:
        self.flow, self.config, self.train, self.val, self.energy = flow, config, train, val, energy
        self.writer, self.callback, self.seeds = writer, callback, seeds
        self.members = len(seeds)
        anchor = next(flow.parameters())
        self.anchor = anchor
        self.params = [p for p in flow.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=config.lr, foreach=True)
        self.generators = [torch.Generator(device=anchor.device).manual_seed(seed) for seed in seeds]
        self.histories = [History() for _ in seeds]
        self.step = 0
        self.interval_loss, self.interval_count = [0.0] * self.members, 0
        self.best_state: dict[str, Tensor] | None = None
        self.bad_evals = [0] * self.members
        self.config_json: dict[str, Any] = {}

    @property
    def active(self) -> list[bool]:
        """Members still training (not stopped early, not failed)."""
        return [not (h.stopped_early or h.failed) for h in self.histories]

    # -- persistence --
    def _settings(self) -> dict[str, Any]:
        settings = {"objective": "nll" if self.energy is None else "reverse_kl", **dataclasses.asdict(self.config)}
        if not settings["init_source"]:  # recorded only when set: runs from before it existed still resume
            del settings["init_source"]
        return settings

    def start_files(self, meta: dict[str, Any]) -> None:
        assert self.writer is not None
        dtype = str(self.anchor.dtype).removeprefix("torch.")
        ensemble = {"ensemble": list(self.flow.ensemble_shape), "seeds": self.seeds} if self.flow.ensemble_shape else {}
        self.config_json = {"dim": self.flow.dim, "dtype": dtype} | ensemble | meta | {
            "fit": self._settings(), "run_id": new_run_id()}
        self.writer.write_json("config.json", self.config_json)

    def checkpoint(self) -> None:
        assert self.writer is not None
        tensors = {f"flow.{k}": v for k, v in self.flow.state_dict().items()}
        tensors |= {f"optim.{i}.{key}": value for i, state in self.opt.state_dict()["state"].items()
                    for key, value in state.items()}
        tensors |= {f"rng.generator.{m}": g.get_state() for m, g in enumerate(self.generators)}
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["probe"] = probe_outputs(self.flow)
        if self.best_state is not None:
            tensors |= {f"best.{k}": v for k, v in self.best_state.items()}
        hs = self.histories
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": self.config_json,
            "history_length": sum(len(h.records) for h in hs),
            "best_step": [h.best_step for h in hs],
            "best_val_nll": [h.best_val_nll for h in hs],
            "bad_evals": self.bad_evals,
            "stopped_early": [h.stopped_early for h in hs],
            "failed": [h.failed for h in hs],
            "interval_loss": self.interval_loss,
            "interval_count": self.interval_count,
        }
        self.writer.save_checkpoint(state, tensors)

    def restore(self, meta: dict[str, Any] | None) -> None:
        """Load the checkpoint after checking it belongs to this call: same configuration on disk and
        in the checkpoint, same settings and ``meta``, same flow (probe outputs), intact files.

        Raises:
            CorruptFileError: "corrupt checkpoint …" (checksums, missing or ill-typed fields or tensors).
            ValueError: the run differs from this call.
        """
        writer = self.writer
        assert writer is not None
        state, tensors = writer.load_checkpoint()
        where = f"corrupt checkpoint in {writer.path}"
        _check_state(state, self.config.steps, self.members, where)
        recorded = state["config"]
        on_disk = json.loads((writer.path / "config.json").read_text()) if (writer.path / "config.json").is_file() \
            else None
        if on_disk != recorded:
            raise ValueError(f"{writer.path / 'config.json'} differs from the configuration its checkpoint recorded "
                             f"({_first_difference(on_disk, recorded)}); restore it or start a new run")
        if recorded.get("fit") != self._settings():
            difference = _first_difference(self._settings(), recorded.get("fit"))
            raise ValueError(f"cannot resume {writer.path}: its settings differ from this call's ({difference})")
        if self.flow.ensemble_shape and recorded.get("seeds") != self.seeds:
            raise ValueError(f"cannot resume {writer.path}: its member seeds are {recorded.get('seeds')}, this "
                             f"call's are {self.seeds}")
        for key, value in (meta or {}).items():
            if recorded.get(key) != value:
                raise ValueError(f"cannot resume {writer.path}: its {key} is {recorded.get(key)!r}, this call's "
                                 f"is {value!r}")
        self.config_json = recorded
        flow_tensors = {k.removeprefix("flow."): v for k, v in tensors.items() if k.startswith("flow.")}
        load_state(self.flow, flow_tensors, f"checkpoint tensors in {writer.path}")
        if "probe" not in tensors:
            raise CorruptFileError(f"{where}: no probe outputs")
        check_probe(self.flow, tensors["probe"], f"checkpoint tensors in {writer.path}")
        self._restore_optimiser(tensors, where)
        try:
            for m, generator in enumerate(self.generators):
                generator.set_state(tensors[f"rng.generator.{m}"])
            torch.set_rng_state(tensors["rng.torch"])
        except (KeyError, RuntimeError, TypeError):
            raise CorruptFileError(f"{where}: bad random-generator state") from None
        best = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
        if best:
            load_state(self.flow, best, f"best weights in the checkpoint of {writer.path}")  # checks them
            load_state(self.flow, flow_tensors, f"checkpoint tensors in {writer.path}")
        self.best_state = best or None
        self.step = state["step"]
        self.bad_evals = list(state["bad_evals"])
        self.interval_loss, self.interval_count = list(state["interval_loss"]), state["interval_count"]
        records = writer.truncate_history(state["history_length"])
        for m, h in enumerate(self.histories):
            h.records = [r for r in records if r.get("member", 0) == m]
            h.best_step, h.best_val_nll = state["best_step"][m], state["best_val_nll"][m]
            h.stopped_early, h.failed = state["stopped_early"][m], state["failed"][m]

    def _restore_optimiser(self, tensors: dict[str, Tensor], where: str) -> None:
        state: dict[int, dict[str, Tensor]] = {}
        for i, p in enumerate(self.params):
            entry = {key: tensors.get(f"optim.{i}.{key}") for key in ("step", "exp_avg", "exp_avg_sq")}
            missing = [k for k, v in entry.items() if v is None]
            if missing or entry["exp_avg"].shape != p.shape or entry["exp_avg_sq"].shape != p.shape:
                raise CorruptFileError(f"{where}: Adam state of parameter {i} is missing or has the wrong shape")
            state[i] = entry  # type: ignore[assignment]
        self.opt.load_state_dict({"state": state, "param_groups": self.opt.state_dict()["param_groups"]})

    # -- training --
    def _points(self, per_member: list[Tensor]) -> Tensor:
        """Stack the members' ``(n, d)`` points into the flow's layout: ``(n, d)`` or ``(*E, n, d)``."""
        if not self.flow.ensemble_shape:
            return per_member[0]
        return torch.stack(per_member).reshape(*self.flow.ensemble_shape, *per_member[0].shape)

    def losses(self, n: int, generators: list[torch.Generator]) -> Tensor:
        """Each member's mini-batch loss ``(M,)`` of ``n`` points drawn with its generator: NLL per
        point in nats/dim, or ``log q + βU`` per sample."""
        dim, m = self.flow.dim, self.members
        if self.train is not None:
            log_p = self.flow.log_prob(self._batch(n, generators))
            return -log_p.reshape(m, n).mean(-1) / dim
        eps = self._noise(n, generators)
        z = self.flow.base.reparametrise(eps)
        x, logdet = self.flow(z)
        warm_up = self.config.anneal * self.config.steps
        beta = min(1.0, 0.01 + self.step / warm_up) if warm_up > 0 else 1.0
        log_q = self.flow._base_log_prob(z).reshape(-1) - logdet.reshape(-1)
        return (log_q + beta * self._energy(x.reshape(-1, dim))).reshape(m, n).mean(-1)

    def _batch(self, n: int, generators: list[torch.Generator]) -> Tensor:
        """Each member's mini-batch of ``n`` training points, indices drawn with its generator, in the flow's
        layout; an ensemble on the CPU draws the indices in one compiled call and gathers them in one op."""
        train, a = self.train, self.anchor
        assert train is not None
        module = native.usable(a) if len(generators) > 1 else None
        if module is None:
            index = [torch.randint(0, train.shape[1], (n,), generator=g, device=a.device) for g in generators]
            return self._points([train[i][idx] for i, idx in enumerate(index)])
        members, size, dim = train.shape
        index = torch.empty(members, n, dtype=torch.long, device=a.device)
        module.randint_members(index, size, generators)
        index += torch.arange(0, members * size, size, device=a.device).unsqueeze(-1)  # rows of the flat points
        return train.view(-1, dim).index_select(0, index.view(-1)).view(*self.flow.ensemble_shape, n, dim)

    def _noise(self, n: int, generators: list[torch.Generator]) -> Tensor:
        """Each member's ``(n, d)`` standard normal noise from its generator, in the flow's layout; an ensemble
        on the CPU draws it in one compiled call (the same numbers as one ``torch.randn`` per member)."""
        a, dim = self.anchor, self.flow.dim
        module = native.usable(a) if len(generators) > 1 else None
        if module is None:
            return self._points([torch.randn(n, dim, generator=g, device=a.device, dtype=a.dtype) for g in generators])
        eps = torch.empty(len(generators), n, dim, device=a.device, dtype=a.dtype)
        module.normal_members(eps, generators)
        return eps.reshape(*self.flow.ensemble_shape, n, dim)

    def _energy(self, x: Tensor) -> Tensor:
        energy = self.energy
        assert energy is not None
        name = getattr(energy, "name", "energy")
        u = energy.energy(x)
        if not isinstance(u, Tensor) or u.shape != (x.shape[0],):
            shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
            raise ValueError(f"energy {name} returned {shape} for {x.shape[0]} points; expected shape ({x.shape[0]},)")
        return u

    def check_memory(self) -> None:
        """Refuse a batch size whose training step cannot fit in the memory available now.

        The memory autograd keeps per point is measured on two small batches (saved-tensor hooks)
        and scaled to ``batch_size``, with room for the same again in transients and gradients.

        Raises:
            ValueError: naming the estimate and what is available.
        """
        sizes, saved = (8, 40), []
        for n in sizes:
            total = 0

            def pack(t: Tensor) -> Tensor:
                nonlocal total
                total += t.numel() * t.element_size()
                return t

            probes = [torch.Generator(device=self.anchor.device).manual_seed(0) for _ in range(self.members)]
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                self.losses(n, probes)
            saved.append(total)
        per_point = max((saved[1] - saved[0]) / (sizes[1] - sizes[0]), 0.0)
        per_point += 2 * self.members * self.flow.dim * self.anchor.element_size()  # the batch and its gradient
        check_memory(2 * per_point * self.config.batch_size, f"a training step at batch_size {self.config.batch_size} "
                     f"({per_point:.0f} bytes per point; use a smaller batch size)", self.anchor.device)

    def _clip(self, active: list[bool]) -> list[float]:
        """Each member's gradient norm; scales its gradients to ``clip`` as ``clip_grad_norm_`` does for a
        single flow, and zeroes the gradients of members that no longer train."""
        m = self.members
        grads = [p.grad.reshape(m, -1) for p in self.params if p.grad is not None]
        norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dim=1) for g in grads]), dim=0)
        clip = self.config.clip or math.inf
        coef = torch.clamp(clip / (norms + 1e-6), max=1.0).unsqueeze(-1)
        if all(active):
            for g in grads:
                g.mul_(coef.to(g.dtype))
            return norms.tolist()
        keep = torch.tensor(active, device=norms.device).unsqueeze(-1)
        for g in grads:
            g.copy_(torch.where(keep, g * coef.to(g.dtype), torch.zeros_like(g)))
        return norms.tolist()

    def _fail(self, member: int, what: str) -> None:
        message = f"training diverged at step {self.step} ({what}); try a smaller lr"
        if not self.flow.ensemble_shape:
            raise ValueError(message)
        self.histories[member].failed = message

    def _val_nll(self) -> list[float] | None:
        """Each member's validation NLL (nats/dim), or ``None`` without a validation split."""
        if self.val is None:
            return None
        with torch.no_grad():
            log_p = self.flow.log_prob(self._points(list(self.val)))
        return (-log_p.reshape(self.members, -1).mean(-1) / self.flow.dim).tolist()

    def validate_start(self) -> None:
        """Make the flow before the first step a candidate for the best weights (``best_step = 0``): after
        ``init_source``, a run never ends worse on its validation split than the flow it started as."""
        val_nll = self._val_nll()
        if val_nll is None:
            return
        finite = [m for m, v in enumerate(val_nll) if math.isfinite(v)]
        for m in finite:
            self.histories[m].best_val_nll, self.histories[m].best_step = val_nll[m], 0
        if finite:
            self._keep_best(finite)

    def _record(self, grad_norms: list[float], started: float) -> list[bool]:
        """Append a history record per training member (and validate); returns who stops early now."""
        active, count = self.active, max(self.interval_count, 1)
        val_nll = self._val_nll()
        stops = [False] * self.members
        improved = []
        for m, h in enumerate(self.histories):
            if not active[m]:
                continue
            record = {"step": self.step, "loss": self.interval_loss[m] / count, "lr": self.config.lr_at(self.step - 1),
                      "grad_norm": grad_norms[m], "seconds": time.perf_counter() - started}
            if self.flow.ensemble_shape:
                record["member"] = m
            if val_nll is not None:
                record["val_nll"] = val_nll[m]
                if not math.isfinite(val_nll[m]):
                    self._fail(m, f"validation NLL {val_nll[m]}")
                elif h.best_val_nll is None or val_nll[m] < h.best_val_nll:
                    h.best_val_nll, h.best_step, self.bad_evals[m] = val_nll[m], self.step, 0
                    improved.append(m)
                else:
                    self.bad_evals[m] += 1
                    stops[m] = self.config.patience is not None and self.bad_evals[m] >= self.config.patience
            h.records.append(record)
            if self.writer is not None:
                self.writer.append_history(record)
            if self.callback is not None:
                self.callback(record)
        self.interval_loss, self.interval_count = [0.0] * self.members, 0
        if improved:
            self._keep_best(improved)
        return stops

    def _keep_best(self, members: list[int]) -> None:
        """Copy the current weights of ``members`` into the best weights."""
        state = {k: v.detach() for k, v in self.flow.state_dict().items()}
        if self.best_state is None:
            self.best_state = {k: v.clone() for k, v in state.items()}
            return
        shape = self.flow.ensemble_shape
        for name, value in state.items():
            if shape and tuple(value.shape[: len(shape)]) == shape:
                flat, best = value.reshape(self.members, -1), self.best_state[name].view(self.members, -1)
                best[members] = flat[members]
            else:
                self.best_state[name].copy_(value)

    def run(self) -> list[History]:
        config, started = self.config, time.perf_counter()
        grad_norms = [math.nan] * self.members
        while self.step < config.steps and any(self.active):
            for group in self.opt.param_groups:
                group["lr"] = config.lr_at(self.step)
            self.opt.zero_grad(set_to_none=True)
            losses = self.losses(config.batch_size, self.generators)
            losses.sum().backward()
            values = losses.tolist()
            for m in [m for m, a in enumerate(self.active) if a and not math.isfinite(values[m])]:
                self._fail(m, f"loss {values[m]}")
            grad_norms = self._clip(self.active)
            for m in [m for m, a in enumerate(self.active) if a and not math.isfinite(grad_norms[m])]:
                self._fail(m, f"gradient norm {grad_norms[m]}")
            active = self.active  # (a property: evaluated once per step from here on)
            if not any(active):
                break
            self.opt.step()
            self.step += 1
            self.interval_loss = [s + v if a else s for s, v, a in zip(self.interval_loss, values, active)]
            self.interval_count += 1
            stops = self._record(grad_norms, started) if self.step % config.log_every == 0 else [False] * self.members
            for h, stop in zip(self.histories, stops, strict=True):
                h.stopped_early = h.stopped_early or stop
            if self.writer is not None and (any(stops) or self.step == config.steps or (
                config.checkpoint_every is not None and self.step % config.checkpoint_every == 0
            )):
                self.checkpoint()
        if self.interval_count and any(self.active):
            self._record(grad_norms, started)
        failed = [h.failed for h in self.histories if h.failed]
        if len(failed) == self.members:
            raise ValueError(f"every ensemble member diverged; the first: {failed[0]}")
        if self.best_state is not None:
            self.flow.load_state_dict(self.best_state)
        for h in self.histories:
            h.steps_done = max((r["step"] for r in h.records), default=self.step) if h.stopped_early else self.step
            h.seconds = time.perf_counter() - started
        if self.writer is not None:
            metadata = {"run_id": self.config_json["run_id"], "step": str(self.step),
                        "probe": json.dumps(probe_outputs(self.flow).tolist())}
            self.writer.save_weights(self.flow, metadata)
        return self.histories


_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "step": (int,), "config": (dict,), "history_length": (int,), "interval_count": (int,),
}
_MEMBER_TYPES: dict[str, tuple[type, ...]] = {
    "best_step": (int, type(None)), "best_val_nll": (float, int, type(None)), "bad_evals": (int,),
    "stopped_early": (bool,), "failed": (str, type(None)), "interval_loss": (float, int),
}


def _check_state(state: dict[str, Any], steps: int, members: int, where: str) -> None:
    """Fields and ranges of ``checkpoint.json`` (its checksum was verified already)."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CorruptFileError(f"{where}: checkpoint format {state.get('format')!r}, this flowprobe reads "
                               f"{CHECKPOINT_FORMAT}")

    def typed(value: Any, types: tuple[type, ...]) -> bool:
        return isinstance(value, types) and (not isinstance(value, bool) or bool in types)

    for key, types in _STATE_TYPES.items():
        if not typed(state.get(key), types):
            raise CorruptFileError(f"{where}: field {key!r} is missing or not {' or '.join(t.__name__ for t in types)}")
    for key, types in _MEMBER_TYPES.items():
        values = state.get(key)
        if not (isinstance(values, list) and len(values) == members and all(typed(v, types) for v in values)):
            names = " or ".join(t.__name__ for t in types)
            raise CorruptFileError(f"{where}: field {key!r} is missing or not a list of {members} {names}")
    if not 1 <= state["step"] <= steps:
        raise CorruptFileError(f"{where}: step {state['step']} lies outside [1, {steps}]")
    if min(state["history_length"], state["interval_count"], *state["bad_evals"]) < 0:
        raise CorruptFileError(f"{where}: negative counters")


def _first_difference(a: Any, b: Any) -> str:
    """A short description of the first key where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return f"{key}: {b.get(key)!r} in the run, {a.get(key)!r} now"
    return f"{b!r} in the run, {a!r} now"
