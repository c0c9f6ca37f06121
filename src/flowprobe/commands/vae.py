"""``flowprobe vae train | eval | table``: VAEs with flow posteriors from the command line.

Several processes: ``torchrun --nproc_per_node=N -m flowprobe vae train …`` (the same command on
every host with torchrun's rendezvous flags); rank 0 writes the run directory and prints, every
rank trains its share of each global mini-batch (:mod:`flowprobe.vae.distributed`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from flowprobe.cli import add_parser, check_finite, finite_float, positive_int
from flowprobe.io import atomic_write, read_json, sha256_file, write_json
from flowprobe.rundir import OutputDir
from flowprobe.vae.data import BUILTIN, load_images
from flowprobe.vae.distributed import Distributed
from flowprobe.vae.evaluation import evaluate
from flowprobe.vae.model import PRESETS
from flowprobe.vae.table import acceptance, images_of, run_table, summarise, table_markdown
from flowprobe.vae.training import DTYPES, OPTIMISERS, TEST_SEED, VAEConfig, load_vae, train_vae

__all__ = ["add_commands"]

CONFIG_FLAGS = tuple(f.name for f in dataclasses.fields(VAEConfig))


class EpochProgress:
    """A progress bar of epochs on a terminal, a line every ``every`` epochs otherwise."""

    def __init__(self, total: int, stream: TextIO | None = None, every: int = 10, label: str = "") -> None:
        self.total, self.every, self.label = total, every, label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()

    def __call__(self, record: dict[str, Any]) -> None:
        epoch = record["epoch"]
        text = (f"{self.label}epoch {epoch}/{self.total} loss={record['loss']:.3f} β={record['beta']:.2f} "
                f"val −ELBO={record['val_neg_elbo']:.3f} ({record['seconds']:.0f} s)")
        if self.tty:
            filled = int(20 * epoch / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (20 - filled)}] {text}  ")
        elif epoch % self.every == 0 or epoch == self.total:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Settings given on the command line (options left alone are ``None``)."""
    given = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k, None) is not None}
    if given.get("patience") == 0:
        given["patience"] = None
    return given


def _config(args: argparse.Namespace) -> VAEConfig:
    return VAEConfig(**_settings(args))


def _data_source(data: str) -> str:
    return data if data == BUILTIN else str(Path(data).resolve())


def _resume_settings(run: Path, args: argparse.Namespace) -> tuple[VAEConfig, str]:
    """The run's settings and data; options given on the command line must agree with them."""
    recorded = read_json(run / "config.json")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("vae"), dict):
        raise ValueError(f"{run / 'config.json'} is not a flowprobe VAE run configuration")
    try:
        config = VAEConfig(**recorded["vae"])
    except TypeError as err:
        raise ValueError(f"{run / 'config.json'}: bad VAE settings ({err})") from None
    for key, value in _settings(args).items():
        if value != getattr(config, key):
            raise ValueError(f"--{key.replace('_', '-')} {value} conflicts with the run's {getattr(config, key)!r}; a "
                             "resumed run keeps its own settings")
    source = recorded.get("data", BUILTIN)
    if args.data is not None and _data_source(args.data) != source:
        raise ValueError(f"--data {args.data} conflicts with the run's data {source!r}")
    if args.out is not None and Path(args.out).resolve() != run.resolve():
        raise ValueError(f"--out {args.out} conflicts with --resume {run}; a run is resumed in its own directory")
    if args.overwrite:
        raise ValueError("--overwrite and --resume exclude each other")
    return config, source


def _emit(args: argparse.Namespace, result: dict[str, Any], lines: list[str]) -> None:
    check_finite(result)
    print(json.dumps(result) if args.json else "\n".join(lines))


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    return [f"test −ELBO = {metrics['neg_elbo']:.3f} ± {metrics['neg_elbo_se']:.3f} nats (standard error)",
            f"test NLL   = {metrics['nll']:.3f} ± {metrics['nll_se']:.3f} nats (importance sampling, "
            f"S = {metrics['nll_samples']}, {metrics['n_test']} images)"]


def _train_command(args: argparse.Namespace) -> int:
    if args.resume is not None:
        out = Path(args.resume)
        config, source = _resume_settings(out, args)
    else:
        if args.out is None:
            raise ValueError("vae train needs --out DIR (or --resume DIR)")
        out, config, source = Path(args.out), _config(args), _data_source(args.data or BUILTIN)
    images = load_images(source)
    with Distributed.from_environment(args.device) as job:
        progress = EpochProgress(config.epochs) if job.writes else None
        trained = train_vae(images, config, out=out, resume=args.resume is not None, overwrite=args.overwrite,
                            job=job, callback=progress, meta={"data": source})
        if progress is not None:
            progress.close()
        if not job.writes:
            return 0
    result = {"out": str(out), "flow": trained.model.spec, "data": source, **trained.metrics.to_json(),
              **trained.summary}
    _emit(args, result, [f"trained a VAE with posterior {trained.model.spec} on {images.name}: "
                         f"{trained.summary['epochs_done']} epochs in {trained.summary['seconds']:.1f} s "
                         f"(best epoch {trained.summary['best_epoch']})", *_metric_lines(result),
                         f"results in {out}"])
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    model, recorded = load_vae(args.run)
    images = load_images(recorded.get("data", BUILTIN))
    config = VAEConfig(**recorded["vae"])
    samples = args.nll_samples or config.nll_samples
    seed = config.seed + TEST_SEED if args.seed is None else args.seed
    with Distributed.from_environment(args.device) as job:
        model = model.to(job.device)
        metrics = evaluate(model, images.test, samples, config.eval_rows, seed, job).to_json()
        if not job.writes:
            return 0
    _emit(args, {"run": args.run, **metrics}, _metric_lines(metrics))
    return 0


def _table_command(args: argparse.Namespace) -> int:
    config = _config(args)
    source = _data_source(args.data or BUILTIN)
    images = images_of(source)
    with Distributed.from_environment(args.device) as job:
        table_dir = OutputDir(args.out, "vae table") if job.writes else None
        if table_dir is not None:
            table_dir.open()
        try:
            def progress(posterior: str, seed: int, record: dict[str, Any]) -> None:
                EpochProgress(config.epochs, every=50, label=f"{posterior} seed {seed}: ")(record)

            results = run_table(source, config, args.out, args.posteriors, args.seeds, job, args.workers,
                                None if args.quiet else progress)
            if table_dir is None:
                return 0
            rows = summarise(results)
            text = table_markdown(rows, published=images.is_mnist)
            checks = acceptance(rows)
            table = {"data": source, "settings": dataclasses.asdict(config), "rows": rows, "acceptance": checks}
            _write(table_dir, "table.json", lambda path: write_json(path, table))
            markdown = text + "\n"
            _write(table_dir, "table.md", lambda path: atomic_write(path, lambda tmp: Path(tmp).write_text(markdown)))
        finally:
            if table_dir is not None:
                table_dir.close()
    _emit(args, table, [text, "", f"checks: {json.dumps(checks)}"])
    return 0


def _write(directory: OutputDir, name: str, write: Callable[[Path], None]) -> None:
    """Write file ``name`` of ``directory`` (atomically) and record its SHA-256."""
    path = directory.claim(name)
    write(path)
    directory.seal(name, sha256_file(path))


def _training_options(p: argparse.ArgumentParser, flow: bool = True) -> None:
    d = VAEConfig()
    p.add_argument("--data", help=f"'{BUILTIN}' (default: scikit-learn's 8×8 digits, binarised) or a directory of "
                                  "MNIST files (binarized_mnist_*.amat, or train-/t10k-images-idx3-ubyte[.gz])")
    if flow:
        p.add_argument("--flow", help=f"posterior: none (default), a preset ({', '.join(PRESETS)}) or a flow spec "
                                      "such as planar:16:tanh or sylvester:16:orthogonal:m=8")
    p.add_argument("--latent", type=positive_int, help=f"latent dimension (default {d.latent})")
    p.add_argument("--hidden", type=positive_int, help=f"hidden units per layer (default {d.hidden})")
    p.add_argument("--depth", type=positive_int, help=f"hidden layers of encoder and decoder (default {d.depth})")
    p.add_argument("--gated", action="store_const", const=True, help="gated dense hidden layers instead of ReLU")
    p.add_argument("--epochs", type=positive_int, help=f"most epochs (default {d.epochs})")
    p.add_argument("--batch-size", type=positive_int, help=f"global mini-batch (default {d.batch_size})")
    p.add_argument("--lr", type=finite_float, help=f"learning rate (default {d.lr})")
    p.add_argument("--optimizer", choices=sorted(OPTIMISERS), help=f"default {d.optimizer}")
    p.add_argument("--warmup", type=int, help=f"epochs of KL warm-up, 0: none (default {d.warmup})")
    p.add_argument("--patience", type=int, help=f"early stopping after this many epochs without a better "
                                                f"validation −ELBO after the warm-up; 0: never (default {d.patience})")
    p.add_argument("--seed", type=int, help=f"seed of the weights and of every random draw (default {d.seed})")
    p.add_argument("--dtype", choices=sorted(DTYPES), help=f"default {d.dtype}")
    p.add_argument("--nll-samples", type=positive_int, help=f"importance samples per test image (default "
                                                            f"{d.nll_samples})")
    p.add_argument("--eval-rows", type=positive_int, help=f"image-sample pairs per evaluation pass (default "
                                                          f"{d.eval_rows})")
    p.add_argument("--checkpoint-every", type=positive_int, help=f"epochs between checkpoints (default "
                                                                 f"{d.checkpoint_every})")
    p.add_argument("--log-every", type=positive_int, help="steps between extra history records (default: per epoch)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object of results")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``vae`` with its sub-commands ``train``, ``eval`` and ``table``."""
    vae = add_parser(sub, "vae")
    commands = vae.add_subparsers(dest="vae_command", required=True, metavar="VAE_COMMAND")

    p = commands.add_parser("train", help="train a VAE with a flow posterior (torchrun: several processes)")
    _training_options(p)
    p.add_argument("--out", help="run directory (new or empty; see --overwrite and --resume)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out once the new one has written "
                                                            "its first checkpoint (files flowprobe did not write "
                                                            "are kept)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.set_defaults(func=_train_command)

    p = commands.add_parser("eval", help="test −ELBO and importance-sampled NLL of a finished run")
    p.add_argument("run", help="run directory")
    p.add_argument("--nll-samples", type=positive_int, help="importance samples per test image (default: the run's)")
    p.add_argument("--seed", type=int, help="seed of the importance samples (default: the run's, which reproduces "
                                            "its results.json)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object of results")
    p.set_defaults(func=_eval_command)

    p = commands.add_parser("table", help="van den Berg et al.'s Table 1 over seeds: every posterior, same budget")
    _training_options(p, flow=False)
    p.add_argument("--out", required=True, help="directory of the runs and the table (rerun it to continue)")
    p.add_argument("--posteriors", nargs="+", default=list(PRESETS), choices=PRESETS, metavar="NAME",
                   help=f"posteriors (default: all of {', '.join(PRESETS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="runs trained at once, in worker processes of one thread each (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_table_command)
