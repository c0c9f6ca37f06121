r"""Training a flow-posterior VAE: KL warm-up, early stopping, checkpoints and exact resume, DDP.

Objective per epoch ``t = 1, 2, …`` (van den Berg et al.'s schedule): the mean over a mini-batch of

.. math::

    -\log p(x\mid z_K) - \beta_t \big(\log p(z_K) - \log q_K(z_K\mid x)\big),
    \qquad \beta_t = \min(1, t / T_\text{warm-up}),

with one reparametrised sample per image; ``β_t = 1`` gives the negative ELBO. After each epoch
the validation ``−ELBO`` (``β = 1``, the same noise every epoch, so epochs are compared on equal
terms) decides the best weights; after the warm-up, ``patience`` epochs without improvement stop
the run. The best weights are then scored on the test images (:mod:`flowprobe.vae.evaluation`).

Every random draw of the training (mini-batch order, noise) comes from one ``torch.Generator``
seeded with ``seed`` and checkpointed with the weights, the optimiser's state and the best weights,
so a resumed run continues exactly (same seed and checkpoint boundaries: bit-identical weights).

Files (``out``, a :class:`~flowprobe.rundir.RunWriter`: atomic writes, one writer, a new run staged
until its first checkpoint): ``config.json`` (settings, data and its SHA-256, run id),
``history.jsonl`` (one record per epoch; per ``log_every`` steps too), ``checkpoint.json`` +
``checkpoint-<step>.safetensors`` (every ``checkpoint_every`` epochs), ``weights.safetensors`` (the
best weights) and ``results.json`` (test metrics). Under ``torchrun`` only rank 0 writes.

References:
    R. van den Berg, L. Hasenclever, J. M. Tomczak, M. Welling. Sylvester Normalizing Flows for
    Variational Inference. UAI 2018 (warm-up, early stopping, Adamax). https://arxiv.org/abs/1803.05649
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowprobe.io import CorruptFileError, load_state, load_tensors, read_json
from flowprobe.optim import FlatAdamax
from flowprobe.rundir import META, RunWriter, new_run_id
from flowprobe.vae.data import BinaryImages
from flowprobe.vae.distributed import Distributed, RankFailedError
from flowprobe.vae.evaluation import TestMetrics, evaluate
from flowprobe.vae.model import FlowVAE
from flowprobe.validation import validation

__all__ = ["DTYPES", "OPTIMISERS", "TEST_SEED", "TrainedVAE", "VAEConfig", "build_model", "data_fingerprint",
           "load_vae", "train_vae"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
OPTIMISERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamax": lambda params, lr: FlatAdamax(params, lr=lr, eps=1e-7),  # van den Berg et al.; torch's Adamax, flat
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr, foreach=True),
}
CHECKPOINT_FORMAT = 1
VALIDATION_SEED = 0x5EED  # the validation noise: offset from the run's seed
TEST_SEED = 0x7E57  # the test samples: offset from the run's seed


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Model and training settings (the defaults are the digits table's budget; van den Berg et al.'s
    MNIST settings are ``latent=64, epochs=2000, lr=5e-4, warmup=100, patience=100``).

    Attributes:
        flow: Posterior flow: ``none``, a preset (:data:`~flowprobe.vae.model.PRESETS`) or a flow spec.
        latent: Latent dimension ``d``.
        hidden: Width of the hidden layers.
        depth: Hidden layers of the encoder and of the decoder.
        gated: Gated dense hidden layers instead of ReLU ones.
        epochs: Most epochs to train.
        batch_size: Global mini-batch ``B`` (split among the ranks).
        lr: Learning rate.
        optimizer: ``adamax`` (eps 1e-7, as van den Berg et al.) or ``adam``.
        warmup: Epochs of KL warm-up (``β_t = min(1, t/warmup)``; 0: none).
        patience: Epochs after the warm-up without a better validation ``−ELBO`` before stopping
            (``None``: never).
        seed: Seed of the initial weights and of every random draw of the training.
        dtype: ``float32`` or ``float64``.
        nll_samples: Importance samples ``S`` per test image.
        eval_rows: Image-sample pairs per decoder pass when evaluating.
        checkpoint_every: Epochs between checkpoints (with an output directory).
        log_every: Steps between extra history records (``None``: one record per epoch only).
    """

    flow: str = "none"
    latent: int = 8
    hidden: int = 128
    depth: int = 2
    gated: bool = False
    epochs: int = 100
    batch_size: int = 100
    lr: float = 1e-3
    optimizer: str = "adamax"
    warmup: int = 25
    patience: int | None = 25
    seed: int = 0
    dtype: str = "float32"
    nll_samples: int = 5000
    eval_rows: int = 20_000
    checkpoint_every: int = 10
    log_every: int | None = None

    def __post_init__(self) -> None:
        positive = ("latent", "hidden", "depth", "epochs", "batch_size", "nll_samples", "eval_rows",
                    "checkpoint_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("patience", "log_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer (epochs), got {self.warmup!r}")
        if not (isinstance(self.lr, float | int) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.optimizer not in OPTIMISERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of: {', '.join(OPTIMISERS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of: {', '.join(DTYPES)}")

    def beta(self, epoch: int) -> float:
        """The KL weight of epoch ``epoch`` (1-based)."""
        return 1.0 if self.warmup == 0 else min(1.0, epoch / self.warmup)


@dataclasses.dataclass
class TrainedVAE:
    """What :func:`train_vae` returns.

    Attributes:
        model: The VAE with its best weights (on the training device).
        records: The history (epoch records, and step records with ``log_every``).
        metrics: Test ``−ELBO`` and ``NLL`` of the best weights.
        summary: JSON-ready facts: epochs and steps done, best epoch, early stopping, seconds.
    """

    model: FlowVAE
    records: list[dict[str, Any]]
    metrics: TestMetrics
    summary: dict[str, Any]


def build_model(config: VAEConfig, data_dim: int) -> FlowVAE:
    """The VAE of ``config``, initialised from ``config.seed`` (torch's global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            model = FlowVAE(data_dim, config.latent, config.hidden, config.depth, config.flow, config.gated)
        except (ValueError, TypeError) as err:
            raise ValueError(f"flow {config.flow!r}: {err}") from None
    return model.to(DTYPES[config.dtype])


def data_fingerprint(images: BinaryImages) -> str:
    """SHA-256 of the three splits' pixels (a resume refuses other data)."""
    digest = hashlib.sha256()
    for split in (images.train, images.val, images.test):
        digest.update(str(tuple(split.shape)).encode())
        digest.update(split.contiguous().numpy().tobytes())
    return digest.hexdigest()


def train_vae(
    images: BinaryImages,
    config: VAEConfig | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    job: Distributed | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    meta: dict[str, Any] | None = None,
    **settings: Any,
) -> TrainedVAE:
    """Train a flow-posterior VAE on ``images`` and score its best weights on the test images.

    Args:
        images: Binary images (:func:`~flowprobe.vae.data.load_images`).
        config: A :class:`VAEConfig`; keyword ``settings`` override it.
        out: Run directory (see the module docstring); written by rank 0 only.
        resume: Continue the run in ``out`` (its settings and data must be this call's).
        overwrite: Replace the run in ``out`` once this one has written its first checkpoint.
        job: The data-parallel job (default: one process on the CPU).
        callback: Called with every epoch record (rank 0; e.g. a progress bar).
        meta: Extra JSON-ready facts for ``config.json`` (e.g. ``{"data": source}``); a resume checks
            they are the run's.

    Raises:
        ValueError: bad settings, a diverged loss, a resume that does not match the run or a corrupt
            checkpoint (``CorruptFileError``).
    """
    config = dataclasses.replace(config or VAEConfig(), **settings)
    job = job or Distributed()
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    if resume and out is None:
        raise ValueError("resume needs the run directory (out=...)")
    n_train = images.train.shape[0]
    if not job.world <= config.batch_size <= n_train:
        raise ValueError(f"batch_size {config.batch_size} must lie in [{job.world} (ranks), {n_train} (training "
                         "images)]")
    meta = {"data_dim": images.dim, "data_sha256": data_fingerprint(images), "data_sizes": images.sizes()} | (
        meta or {})
    loop = _Loop(images, config, job, callback)
    meta = {"posterior": loop.model.spec} | meta  # a preset's spec: a resume refuses another meaning of the name
    writer = RunWriter(out, "resume" if resume else "overwrite" if overwrite else "new", "vae train") \
        if out is not None and job.writes else None
    try:
        with validation(False):
            loop.start(writer, meta)
            loop.run()
            return loop.finish()
    finally:
        if writer is not None:
            writer.close()


def _one_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


class _Loop:
    """One training run on this rank: model, optimiser, generator and counters; ``start`` creates or
    restores the run, ``run`` trains, ``finish`` scores and writes the results."""

    def __init__(self, images: BinaryImages, config: VAEConfig, job: Distributed,
                 callback: Callable[[dict[str, Any]], None] | None) -> None:
        self.images, self.config, self.job, self.callback = images, config, job, callback
        self.model = build_model(config, images.dim).to(job.device)
        self.net = job.wrap(self.model)
        self.opt = OPTIMISERS[config.optimizer](self.model.parameters(), config.lr)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.dtype = DTYPES[config.dtype]
        self.writer: RunWriter | None = None
        self.run_config: dict[str, Any] = {}
        self.records: list[dict[str, Any]] = []
        self.epoch = self.step = self.bad_epochs = 0
        self.best_val, self.best_epoch, self.stopped, self.seconds = math.inf, 0, False, 0.0
        self.best_state: dict[str, Tensor] | None = None

    # -- persistence --
    def start(self, writer: RunWriter | None, meta: dict[str, Any]) -> None:
        """Open the run directory on rank 0 (a resume reads and checks the checkpoint there) and hand
        what it read to every rank; a failure on rank 0 stops every rank."""
        self.writer = writer
        state: dict[str, Any] = {}
        tensors: dict[str, Tensor] = {}
        try:
            if writer is not None:
                writer.open()
                if writer.mode == "resume":
                    state, tensors = self._read_checkpoint(writer, meta)
                else:
                    self.run_config = {"vae": dataclasses.asdict(self.config)} | meta | {"run_id": new_run_id()}
                    writer.write_json("config.json", self.run_config)
        except Exception as err:
            if self.job.world > 1:
                with contextlib.suppress(RankFailedError):
                    self.job.share(None, None, error=f"rank 0 failed: {_one_line(err)}")
            raise
        state, tensors = self.job.share(state, tensors)
        if state:
            self._restore(state, tensors)

    def _read_checkpoint(self, writer: RunWriter, meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        state, tensors = writer.load_checkpoint()
        where = f"corrupt checkpoint in {writer.path}"
        if state.get("format") != CHECKPOINT_FORMAT or not isinstance(state.get("config"), dict):
            raise CorruptFileError(f"{where}: not a flowprobe VAE checkpoint (format {state.get('format')!r})")
        recorded = state["config"]
        if read_json(writer.path / "config.json") != recorded:
            raise ValueError(f"{writer.path / 'config.json'} differs from the configuration its checkpoint recorded; "
                             "restore it or start a new run")
        mine = {"vae": dataclasses.asdict(self.config)} | meta
        for key, value in mine.items():
            if recorded.get(key) != value:
                what = _difference(value, recorded.get(key)) if key == "vae" else f"{recorded.get(key)!r} in the " \
                    f"run, {value!r} now"
                raise ValueError(f"cannot resume {writer.path}: its {key} differs ({what})")
        self.run_config = recorded
        state = dict(state) | {"records": writer.truncate_history(_counter(state, "history_length", where))}
        return state, tensors

    def _restore(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        where = "corrupt checkpoint"
        prefixed = {p: {k.removeprefix(p): v for k, v in tensors.items() if k.startswith(p)}
                    for p in ("model.", "best.", "optim.")}
        best = prefixed["best."]
        if best:
            load_state(self.model, best, f"best weights in the {where}")  # checks names, shapes, values
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        load_state(self.model, prefixed["model."], f"weights in the {where}")
        _load_optimiser(self.opt, prefixed["optim."], where)
        try:
            self.generator.set_state(tensors["rng"])
        except (KeyError, RuntimeError, TypeError):
            raise CorruptFileError(f"{where}: bad random-generator state") from None
        self.epoch, self.step = _counter(state, "epoch", where), _counter(state, "step", where)
        self.bad_epochs, self.best_epoch = _counter(state, "bad_epochs", where), _counter(state, "best_epoch", where)
        self.best_val = float(state.get("best_val") if state.get("best_val") is not None else math.inf)
        self.stopped, self.seconds = bool(state.get("stopped")), float(state.get("seconds", 0.0))
        self.records = list(state["records"])

    def checkpoint(self) -> None:
        if self.writer is None:
            return
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors |= {f"optim.{i}.{key}": v for i, s in self.opt.state_dict()["state"].items() for key, v in s.items()}
        tensors |= {f"best.{k}": v for k, v in (self.best_state or {}).items()}
        tensors["rng"] = self.generator.get_state()
        state = {"format": CHECKPOINT_FORMAT, "config": self.run_config, "epoch": self.epoch, "step": self.step,
                 "bad_epochs": self.bad_epochs, "best_epoch": self.best_epoch,
                 "best_val": None if math.isinf(self.best_val) else self.best_val, "stopped": self.stopped,
                 "seconds": self.seconds, "history_length": len(self.records)}
        self.writer.save_checkpoint(state, tensors)

    def _record(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.writer is not None:
            self.writer.append_history(record)
        if self.callback is not None and self.job.writes and record["kind"] == "epoch":
            self.callback(record)

    # -- training --
    def _batch(self, rows: Tensor) -> Tensor:
        return rows.to(device=self.job.device, dtype=self.dtype)

    def run(self) -> None:
        config, job = self.config, self.job
        train, size = self.images.train, config.batch_size
        steps = train.shape[0] // size  # the last, partial batch of a permutation is left out
        mine = job.part(size)
        while self.epoch < config.epochs and not self.stopped:
            started = time.perf_counter()
            beta = config.beta(self.epoch + 1)
            order = torch.randperm(train.shape[0], generator=self.generator)
            noise = torch.randn(steps * size, self.model.latent, generator=self.generator, dtype=self.dtype)
            total = torch.zeros((), dtype=self.dtype, device=job.device)
            interval = torch.zeros((), dtype=self.dtype, device=job.device)
            for s in range(steps):
                rows = slice(s * size, (s + 1) * size)
                x, eps = self._batch(train[order[rows][mine]]), noise[rows][mine].to(job.device)
                loss = self.net(x, eps, beta).sum()
                self.opt.zero_grad(set_to_none=True)
                (loss * (job.world / size)).backward()
                self.opt.step()
                self.step += 1
                total += loss.detach()
                interval += loss.detach()
                if config.log_every is not None and self.step % config.log_every == 0:
                    value = float(job.sum(interval)) / (config.log_every * size)
                    self._record({"kind": "step", "epoch": self.epoch + 1, "step": self.step, "loss": value,
                                  "beta": beta})
                    interval.zero_()
            self.epoch += 1
            loss_mean = float(job.sum(total)) / (steps * size)
            val = self.validate()
            if not (math.isfinite(loss_mean) and math.isfinite(val)):
                raise ValueError(f"training diverged in epoch {self.epoch} (loss {loss_mean}, validation −ELBO "
                                 f"{val}); try a smaller lr")
            self._judge(val)
            self.seconds += time.perf_counter() - started
            self._record({"kind": "epoch", "epoch": self.epoch, "step": self.step, "loss": loss_mean, "beta": beta,
                          "val_neg_elbo": val, "best_epoch": self.best_epoch, "seconds": self.seconds})
            if self.stopped or self.epoch == config.epochs or self.epoch % config.checkpoint_every == 0:
                self.checkpoint()

    def _judge(self, val: float) -> None:
        """Keep the best weights; count epochs without improvement once the warm-up is over."""
        if val < self.best_val:
            self.best_val, self.best_epoch, self.bad_epochs = val, self.epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        elif self.epoch >= self.config.warmup:
            self.bad_epochs += 1
            patience = self.config.patience
            self.stopped = patience is not None and self.bad_epochs >= patience

    @torch.no_grad()
    def validate(self) -> float:
        """Validation ``−ELBO`` per image (β = 1, one sample each, the same noise every epoch)."""
        val, job = self.images.val, self.job
        generator = torch.Generator().manual_seed(self.config.seed + VALIDATION_SEED)
        noise = torch.randn(val.shape[0], self.model.latent, generator=generator, dtype=self.dtype)
        mine = job.part(val.shape[0])
        total = torch.zeros((), dtype=self.dtype, device=job.device)
        for start in range(mine.start, mine.stop, self.config.eval_rows):
            rows = slice(start, min(start + self.config.eval_rows, mine.stop))
            total += self.model(self._batch(val[rows]), noise[rows].to(job.device)).sum()
        return float(job.sum(total)) / val.shape[0]

    def finish(self) -> TrainedVAE:
        """Load the best weights, score them on the test images, write weights and results (rank 0)."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        config = self.config
        metrics = evaluate(self.model, self.images.test, config.nll_samples, config.eval_rows,
                           config.seed + TEST_SEED, self.job)
        summary = {"epochs_done": self.epoch, "steps": self.step, "best_epoch": self.best_epoch,
                   "stopped_early": self.stopped, "seconds": self.seconds, "ranks": self.job.world}
        if self.writer is not None:
            self.writer.save_weights(self.model, {"run_id": self.run_config["run_id"], "epoch": str(self.best_epoch)})
            self.writer.write_json("results.json", {"flow": self.model.spec, **metrics.to_json(), **summary})
        return TrainedVAE(self.model, self.records, metrics, summary)


def _counter(state: dict[str, Any], key: str, where: str) -> int:
    value = state.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CorruptFileError(f"{where}: field {key!r} is missing or not a non-negative integer")
    return value


def _difference(now: dict[str, Any], recorded: Any) -> str:
    if not isinstance(recorded, dict):
        return f"{recorded!r} in the run"
    key = next(k for k in sorted(set(now) | set(recorded)) if now.get(k) != recorded.get(k))
    return f"{key}: {recorded.get(key)!r} in the run, {now.get(key)!r} now"


def _load_optimiser(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], where: str) -> None:
    """Restore an optimiser's per-parameter state from ``{"<index>.<key>": tensor}``."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        index, _, key = name.partition(".")
        if not index.isdigit() or int(index) >= len(params):
            raise CorruptFileError(f"{where}: optimiser state for parameter {index!r} of {len(params)}")
        if value.dim() > 0 and value.shape != params[int(index)].shape:
            raise CorruptFileError(f"{where}: optimiser state {name} has the wrong shape")
        state.setdefault(int(index), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def load_vae(run: str | Path) -> tuple[FlowVAE, dict[str, Any]]:
    """The best weights of a finished VAE run (CPU) and its ``config.json``; nothing is unpickled.

    Raises:
        FileNotFoundError: no run or no final weights yet.
        ValueError: a configuration that is not a VAE run's, or weights that fail their checksum or do
            not belong to the run.
    """
    run = Path(run)
    config_json = read_json(run / "config.json")
    if not isinstance(config_json, dict) or not isinstance(config_json.get("vae"), dict):
        raise ValueError(f"{run / 'config.json'} is not a flowprobe VAE run configuration")
    try:
        config, dim = VAEConfig(**config_json["vae"]), int(config_json["data_dim"])
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(f"{run / 'config.json'}: bad VAE settings ({_one_line(err)})") from None
    manifest = read_json(run / META / "manifest.json") if (run / META / "manifest.json").is_file() else {}
    sha = manifest.get("files", {}).get("weights.safetensors") if isinstance(manifest, dict) else None
    if not (run / "weights.safetensors").is_file():
        raise FileNotFoundError(f"{run} has no final weights yet (a run in progress or interrupted; resume it)")
    tensors, metadata = load_tensors(run / "weights.safetensors", sha)
    if metadata.get("run_id") != config_json.get("run_id"):
        raise ValueError(f"{run / 'weights.safetensors'} and config.json belong to different runs")
    model = build_model(config, dim)
    load_state(model, tensors, f"weights in {run / 'weights.safetensors'}")
    return model, config_json
