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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowprobe.distributions import Energy
from flowprobe.flow import Flow
from flowprobe.io import CorruptFileError, load_state
from flowprobe.rundir import RunWriter, check_probe, new_run_id, probe_outputs
from flowprobe.validation import check_memory, check_points, validation

__all__ = [
    "FitConfig",
    "History",
    "fit",
    "split_data",
    "split_indices",
]

SCHEDULES = ("cosine", "constant")
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
    """

    records: list[dict[str, float]] = dataclasses.field(default_factory=list)
    best_step: int | None = None
    best_val_nll: float | None = None
    stopped_early: bool = False
    steps_done: int = 0
    seconds: float = 0.0
    train_index: Tensor | None = None
    val_index: Tensor | None = None

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
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def split_data(x: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor | None]:
    """Random ``(train, validation)`` split of the rows of ``x`` (:func:`split_indices`)."""
    train, val = split_indices(x.shape[0], val_fraction, seed)
    return x[train.to(x.device)], (None if val is None else x[val.to(x.device)])


def _mean_nll(flow: Flow, x: Tensor) -> float:
    with torch.no_grad():
        return -float(flow.log_prob(x).mean()) / flow.dim


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
    **settings: Any,
) -> History:
    """Train ``flow`` in place by maximum likelihood (``data``) or reverse KL (``energy``).

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
        callback: Called with every history record (progress display).
        meta: Extra JSON-ready facts stored in ``out/config.json`` next to the settings, the flow's
            ``dim`` and ``dtype``: give ``{"flow": spec}`` (the spec string of
            :func:`~flowprobe.build_flow`) so that :func:`~flowprobe.load_run` can rebuild the flow.
            On resume they must equal the run's.

    Returns:
        The :class:`History`, with the train/validation split used. With a validation split, the flow
        ends with its best weights.

    Raises:
        ValueError: bad inputs, a batch that cannot fit in memory, a diverged loss, or a resume whose
            settings, flow or files differ from the run's (``CorruptFileError`` for damaged checkpoints).
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
    anchor = next(flow.parameters())
    train, val, index = None, None, (None, None)
    if data is not None:
        data = check_points(data, flow.dim, "data").to(device=anchor.device, dtype=anchor.dtype)
        index = split_indices(data.shape[0], config.val_fraction, config.seed)
        train = data[index[0].to(data.device)]
        val = None if index[1] is None else data[index[1].to(data.device)]
    elif energy.dim != flow.dim:
        raise ValueError(f"energy has dim {energy.dim}, flow has dim {flow.dim}")
    if isinstance(out, RunWriter):
        writer, owned = out, contextlib.nullcontext(out)
    elif out is not None:
        writer = RunWriter(out, "resume" if resume else "overwrite" if overwrite else "new")
        owned = writer
    else:
        writer, owned = None, contextlib.nullcontext()
    loop = _Loop(flow, config, train, val, energy, writer, callback)
    with validation(False):
        loop.check_memory()
    with owned:
        if writer is not None and writer.mode == "resume":
            loop.restore(meta)
        elif writer is not None:
            loop.start_files(meta or {})
        with validation(False):
            history = loop.run()
    history.train_index, history.val_index = index
    return history


class _Loop:
    """State of one training run; ``run`` advances it, ``checkpoint``/``restore`` persist it."""

    def __init__(
        self,
        flow: Flow,
        config: FitConfig,
        train: Tensor | None,
        val: Tensor | None,
        energy: Energy | None,
        writer: RunWriter | None,
        callback: Callable[[dict[str, float]], None] | None,
    ) -> None:
        self.flow, self.config, self.train, self.val, self.energy = flow, config, train, val, energy
        self.writer, self.callback = writer, callback
        anchor = next(flow.parameters())
        self.anchor = anchor
        self.params = [p for p in flow.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=config.lr, foreach=True)
        self.generator = torch.Generator(device=anchor.device).manual_seed(config.seed)
        self.history = History()
        self.step = 0
        self.interval_loss, self.interval_count = 0.0, 0
        self.best_state: dict[str, Tensor] | None = None
        self.bad_evals = 0
        self.config_json: dict[str, Any] = {}

    # -- persistence --
    def _settings(self) -> dict[str, Any]:
        return {"objective": "nll" if self.energy is None else "reverse_kl", **dataclasses.asdict(self.config)}

    def start_files(self, meta: dict[str, Any]) -> None:
        assert self.writer is not None
        dtype = str(self.anchor.dtype).removeprefix("torch.")
        self.config_json = {"dim": self.flow.dim, "dtype": dtype} | meta | {"fit": self._settings(),
                                                                           "run_id": new_run_id()}
        self.writer.write_json("config.json", self.config_json)

    def checkpoint(self) -> None:
        assert self.writer is not None
        tensors = {f"flow.{k}": v for k, v in self.flow.state_dict().items()}
        tensors |= {f"optim.{i}.{key}": value for i, state in self.opt.state_dict()["state"].items()
                    for key, value in state.items()}
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["probe"] = probe_outputs(self.flow)
        if self.best_state is not None:
            tensors |= {f"best.{k}": v for k, v in self.best_state.items()}
        h = self.history
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": self.config_json,
            "history_length": len(h.records),
            "best_step": h.best_step,
            "best_val_nll": h.best_val_nll,
            "bad_evals": self.bad_evals,
            "stopped_early": h.stopped_early,
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
        _check_state(state, self.config.steps, where)
        recorded = state["config"]
        on_disk = json.loads((writer.path / "config.json").read_text()) if (writer.path / "config.json").is_file() \
            else None
        if on_disk != recorded:
            raise ValueError(f"{writer.path / 'config.json'} differs from the configuration its checkpoint recorded "
                             f"({_first_difference(on_disk, recorded)}); restore it or start a new run")
        if recorded.get("fit") != self._settings():
            difference = _first_difference(self._settings(), recorded.get("fit"))
            raise ValueError(f"cannot resume {writer.path}: its settings differ from this call's ({difference})")
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
            self.generator.set_state(tensors["rng.generator"])
            torch.set_rng_state(tensors["rng.torch"])
        except (KeyError, RuntimeError, TypeError):
            raise CorruptFileError(f"{where}: bad random-generator state") from None
        best = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
        if best:
            load_state(self.flow, best, f"best weights in the checkpoint of {writer.path}")  # checks them
            load_state(self.flow, flow_tensors, f"checkpoint tensors in {writer.path}")
        self.best_state = best or None
        self.step = state["step"]
        self.bad_evals = state["bad_evals"]
        self.interval_loss, self.interval_count = state["interval_loss"], state["interval_count"]
        self.history.records = writer.truncate_history(state["history_length"])
        self.history.best_step, self.history.best_val_nll = state["best_step"], state["best_val_nll"]
        self.history.stopped_early = state["stopped_early"]

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
    def loss(self, n: int, generator: torch.Generator) -> Tensor:
        """Mini-batch loss of ``n`` points drawn with ``generator``: NLL per point, or ``log q + U``."""
        a = self.anchor
        if self.train is not None:
            index = torch.randint(0, self.train.shape[0], (n,), generator=generator, device=a.device)
            return -self.flow.log_prob(self.train[index]).mean() / self.flow.dim
        z = torch.randn(n, self.flow.dim, generator=generator, device=a.device, dtype=a.dtype)
        x, logdet = self.flow(z)
        warm_up = self.config.anneal * self.config.steps
        beta = min(1.0, 0.01 + self.step / warm_up) if warm_up > 0 else 1.0
        return (self.flow.base.log_prob(z) - logdet + beta * self._energy(x)).mean()

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

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                self.loss(n, torch.Generator(device=self.anchor.device).manual_seed(0))
            saved.append(total)
        per_point = max((saved[1] - saved[0]) / (sizes[1] - sizes[0]), 0.0)
        per_point += 2 * self.flow.dim * self.anchor.element_size()  # the batch and its gradient
        check_memory(2 * per_point * self.config.batch_size, f"a training step at batch_size {self.config.batch_size} "
                     f"({per_point:.0f} bytes per point; use a smaller batch size)", self.anchor.device)

    def _record(self, grad_norm: float, started: float) -> bool:
        """Append a history record (and validate); returns whether to stop early."""
        record = {
            "step": self.step,
            "loss": self.interval_loss / max(self.interval_count, 1),
            "lr": self.config.lr_at(self.step - 1),
            "grad_norm": grad_norm,
            "seconds": time.perf_counter() - started,
        }
        self.interval_loss, self.interval_count = 0.0, 0
        stop = False
        if self.val is not None:
            record["val_nll"] = _mean_nll(self.flow, self.val)
            if not math.isfinite(record["val_nll"]):
                raise ValueError(f"training diverged at step {self.step} (validation NLL {record['val_nll']}); "
                                 "try a smaller lr")
            h = self.history
            if h.best_val_nll is None or record["val_nll"] < h.best_val_nll:
                h.best_val_nll, h.best_step, self.bad_evals = record["val_nll"], self.step, 0
                self.best_state = {k: v.detach().clone() for k, v in self.flow.state_dict().items()}
            else:
                self.bad_evals += 1
                stop = self.config.patience is not None and self.bad_evals >= self.config.patience
        self.history.records.append(record)
        if self.writer is not None:
            self.writer.append_history(record)
        if self.callback is not None:
            self.callback(record)
        return stop

    def run(self) -> History:
        config, started = self.config, time.perf_counter()
        grad_norm = math.nan
        while self.step < config.steps and not self.history.stopped_early:
            for group in self.opt.param_groups:
                group["lr"] = config.lr_at(self.step)
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss(config.batch_size, self.generator)
            loss.backward()
            value = loss.item()
            if not math.isfinite(value):
                raise ValueError(f"training diverged at step {self.step} (loss {value}); try a smaller lr")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, config.clip or math.inf))
            if not math.isfinite(grad_norm):
                raise ValueError(f"training diverged at step {self.step} (gradient norm {grad_norm}); try a smaller lr")
            self.opt.step()
            self.step += 1
            self.interval_loss += value
            self.interval_count += 1
            stop = self.step % config.log_every == 0 and self._record(grad_norm, started)
            if stop:
                self.history.stopped_early = True
            if self.writer is not None and (stop or self.step == config.steps or (
                config.checkpoint_every is not None and self.step % config.checkpoint_every == 0
            )):
                self.checkpoint()
            if stop:
                break
        if self.interval_count:
            self._record(grad_norm, started)
        if self.best_state is not None:
            self.flow.load_state_dict(self.best_state)
        self.history.steps_done = self.step
        self.history.seconds = time.perf_counter() - started
        if self.writer is not None:
            metadata = {"run_id": self.config_json["run_id"], "step": str(self.step),
                        "probe": json.dumps(probe_outputs(self.flow).tolist())}
            self.writer.save_weights(self.flow, metadata)
        return self.history


_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "step": (int,), "config": (dict,), "history_length": (int,), "best_step": (int, type(None)),
    "best_val_nll": (float, int, type(None)), "bad_evals": (int,), "stopped_early": (bool,),
    "interval_loss": (float, int), "interval_count": (int,),
}


def _check_state(state: dict[str, Any], steps: int, where: str) -> None:
    """Fields and ranges of ``checkpoint.json`` (its checksum was verified already)."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CorruptFileError(f"{where}: checkpoint format {state.get('format')!r}, this flowprobe reads "
                          f"{CHECKPOINT_FORMAT}")
    for key, types in _STATE_TYPES.items():
        value = state.get(key)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise CorruptFileError(f"{where}: field {key!r} is missing or not {' or '.join(t.__name__ for t in types)}")
    if not 1 <= state["step"] <= steps:
        raise CorruptFileError(f"{where}: step {state['step']} lies outside [1, {steps}]")
    if min(state["history_length"], state["bad_evals"], state["interval_count"]) < 0:
        raise CorruptFileError(f"{where}: negative counters")


def _first_difference(a: Any, b: Any) -> str:
    """A short description of the first key where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return f"{key}: {b.get(key)!r} in the run, {a.get(key)!r} now"
    return f"{b!r} in the run, {a!r} now"
