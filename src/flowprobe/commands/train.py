"""``flowprobe fit | sample | eval | plot``: train, evaluate and look at flows from the command line.

A run directory (``--out DIR``) holds ``config.json`` (flow spec, target, settings),
``weights.safetensors``, ``history.jsonl``, the last checkpoint and the figures. Every command
that reads a run directory builds the flow from the spec and loads tensors with safetensors:
nothing is unpickled.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import Tensor

from flowprobe.data import load_array
from flowprobe.experiments import REZENDE_CAPTION, Target, rezende_table, score, table_markdown, write_figures
from flowprobe.flow import Flow
from flowprobe.metrics import nll_per_dim
from flowprobe.plots import plot_flow_grid, save_figure
from flowprobe.spec import build_flow, parse_spec
from flowprobe.train import FitConfig, atomic_write, fit, load_weights, read_json, write_json

__all__ = ["add_commands", "load_run"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# -- progress ---------------------------------------------------------------------------------------


class Progress:
    """A progress bar on a terminal, plain periodic lines otherwise (both on ``stream``)."""

    def __init__(self, total: int, stream: TextIO | None = None, every: int = 1000, offset: float = 0.0) -> None:
        stream = stream if stream is not None else sys.stderr
        self.total, self.stream, self.every, self.offset = total, stream, every, offset
        self.tty = stream.isatty()

    def __call__(self, record: dict) -> None:
        step, loss = record["step"], record["loss"] + self.offset
        extra = f" val_nll={record['val_nll']:.4f}" if "val_nll" in record else ""
        if self.tty:
            filled = int(30 * step / self.total)
            bar = "#" * filled + "." * (30 - filled)
            self.stream.write(f"\r[{bar}] {step}/{self.total} loss={loss:.4f}{extra}  ")
            if step >= self.total:
                self.stream.write("\n")
        elif step % self.every == 0 or step >= self.total:
            self.stream.write(f"step {step}/{self.total} loss={loss:.4f}{extra} ({record['seconds']:.0f} s)\n")
        self.stream.flush()


# -- run directories --------------------------------------------------------------------------------


def load_run(run: str | Path) -> tuple[Flow, dict[str, Any], Target]:
    """The trained flow, ``config.json`` and the target of a run directory."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory not found: {run}")
    config = read_json(run / "config.json")
    try:
        spec, dim, dtype = config["flow"], int(config["dim"]), DTYPES[config.get("dtype", "float32")]
        t = config["target"]
        target = Target.load(t["kind"], t["name"], t["n"], t["seed"], t["dim"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{run / 'config.json'} is not a flowprobe run configuration ({err})") from None
    flow = build_flow(spec, dim, dtype)
    load_weights(flow, run / "weights.safetensors")
    return flow, config, target


def _fit_config(settings: dict[str, Any]) -> FitConfig:
    fields = {f for f in FitConfig.__dataclass_fields__}
    return FitConfig(**{k: v for k, v in settings.items() if k in fields})


def _emit(args: argparse.Namespace, result: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(lines))


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    if "nll_flow" in metrics:
        return [
            f"held-out NLL ({metrics['held_out']}, {metrics['n_test']} points, nats/dim):",
            f"  flow      {metrics['nll_flow']:.4f}",
            f"  Gaussian  {metrics['nll_gaussian']:.4f}",
            f"  KDE       {metrics['nll_kde']:.4f}",
        ]
    kl = metrics.get("kl")
    head = f"KL(q‖p) = {kl:.4f} ± {metrics['kl_stderr']:.4f} nats" if kl is not None else (
        f"E_q[log q + U] = {metrics['kl_minus_log_z']:.4f} (no log Z outside 2-D)")
    return [head, f"ESS of importance weights: {metrics['ess_fraction']:.3f} of the samples"]


# -- commands ---------------------------------------------------------------------------------------


def _fit_command(args: argparse.Namespace) -> int:
    if args.resume:
        out = Path(args.resume)
        run = read_json(out / "config.json")
        try:
            spec, dtype, t, settings = run["flow"], run.get("dtype", "float32"), run["target"], run["fit"]
        except KeyError as err:
            raise ValueError(f"{out / 'config.json'} is not a flowprobe run configuration (missing {err})") from None
        target = Target.load(t["kind"], t["name"], t["n"], t["seed"], t["dim"])
        config = _fit_config(settings)
    else:
        if args.flow is None or (args.data is None) == (args.energy is None) or args.out is None:
            raise ValueError("fit needs --flow, --out and exactly one of --data or --energy (or --resume DIR)")
        spec, dtype, out = args.flow, args.dtype, Path(args.out)
        parse_spec(spec)
        kind, name = ("data", args.data) if args.data is not None else ("energy", args.energy)
        target = Target.load(kind, name, args.n_data, args.seed, args.dim)
        config = FitConfig(
            steps=args.steps, lr=args.lr, batch_size=args.batch_size, schedule=args.schedule,
            clip=args.clip if args.clip > 0 else None, val_fraction=args.val_fraction if kind == "data" else 0.0,
            patience=args.patience, log_every=args.log_every, checkpoint_every=args.checkpoint_every, seed=args.seed,
            anneal=args.anneal,
        )
    torch.manual_seed(config.seed)
    flow = build_flow(spec, target.dim, DTYPES[dtype])
    meta = {"flow": spec, "dim": target.dim, "dtype": dtype, "target": target.to_json()}
    log_z = target.log_z()
    every = config.log_every * max(1, config.steps // 20 // config.log_every)
    progress = Progress(config.steps, offset=log_z or 0.0, every=every)
    history = fit(flow, data=target.data, energy=target.energy, config=config, out=out, resume=bool(args.resume),
                  callback=progress, meta=meta)
    metrics = score(flow, target, config, samples=args.kl_samples)
    figures = [] if args.no_plots else write_figures(flow, target, history.records, out)
    result = {"out": str(out), "flow": spec, "target": target.name, **history.summary(), "metrics": metrics,
              "figures": figures}
    write_json(out / "results.json", result)
    _emit(args, result, [f"trained {spec} on {target.name}: {history.steps_done} steps in {history.seconds:.1f} s",
                         *_metric_lines(metrics), f"results in {out}"])
    return 0


def _write_array(path: str, x: np.ndarray, suffix: str) -> None:
    with open(path, "wb") as f:
        if suffix == ".npy":
            np.save(f, x)
        else:
            np.savetxt(f, x, delimiter=",")


def _sample_command(args: argparse.Namespace) -> int:
    flow, _, _ = load_run(args.run)
    output = Path(args.output)
    if output.suffix not in (".npy", ".csv"):
        raise ValueError(f"--output must end in .npy or .csv, got {output.name!r}")
    torch.manual_seed(args.seed)
    x = flow.sample(args.n).to(torch.float64).cpu().numpy()
    atomic_write(output, lambda tmp: _write_array(tmp, x, output.suffix))
    result = {"file": str(output), "n": args.n, "dim": flow.dim, "mean": x.mean(0).tolist(), "std": x.std(0).tolist()}
    _emit(args, result, [f"wrote {args.n} samples of dimension {flow.dim} to {output}"])
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    flow, config, target = load_run(args.run)
    fit_config = _fit_config(config["fit"])
    if args.data is not None:
        x = load_array(args.data, dim=flow.dim)
        metrics = {"data": args.data, "n": x.shape[0], "nll_flow": nll_per_dim(flow, x), "unit": "nats/dim"}
        lines = [f"NLL of {args.data} ({x.shape[0]} points): {metrics['nll_flow']:.4f} nats/dim"]
    else:
        metrics = score(flow, target, fit_config, samples=args.kl_samples)
        lines = _metric_lines(metrics)
    _emit(args, {"run": args.run, "metrics": metrics}, lines)
    return 0


def _read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plot_command(args: argparse.Namespace) -> int:
    if args.run == "rezende":
        return _rezende_command(args)
    run = Path(args.run)
    flow, config, target = load_run(run)
    out = Path(args.out) if args.out else run
    figures = write_figures(flow, target, _read_history(run / "history.jsonl"), out)
    _emit(args, {"figures": figures}, [f"wrote {f}" for f in figures])
    return 0


def _normalised(target: Target) -> Callable[[Tensor], Tensor]:
    energy, log_z = target.energy, target.log_z()
    return lambda x: -energy.energy(x) - log_z


def _rezende_command(args: argparse.Namespace) -> int:
    out = Path(args.out or "rezende-out")
    depths = [int(k) for k in args.depths.split(",")]
    families = args.families.split(",")
    for family in families:
        parse_spec(f"{family}:1")
    energies = args.energies.split(",")
    targets = [Target.load("energy", e) for e in energies]
    config = FitConfig(steps=args.steps, seed=args.seed)
    rows, flows = rezende_table(energies, families, depths, config, progress=lambda s: print(s, file=sys.stderr))
    columns = [f"{f} K={k}" for f in families for k in depths]
    grid = [(t.name, _normalised(t)) for t in targets]
    title = f"Rezende & Mohamed Figure 3: reverse KL, {args.steps} steps each (KL(q‖p) in nats)"
    figure = plot_flow_grid(grid, columns, flows, title=title, caption=REZENDE_CAPTION)
    figure = save_figure(figure, out / "figure3.png")
    table = table_markdown(rows)
    write_json(out / "table.json", {"rows": rows, "caption": REZENDE_CAPTION, "steps": args.steps})
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(table + "\n\n" + REZENDE_CAPTION + "\n"))
    _emit(args, {"rows": rows, "figure": str(figure)}, [table, "", REZENDE_CAPTION, f"figure: {figure}"])
    return 0


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``fit``, ``sample``, ``eval`` and ``plot``."""
    defaults = FitConfig()
    p = sub.add_parser("fit", help="train a flow on data (maximum likelihood) or an energy (reverse KL)")
    p.add_argument("--flow", help="flow spec, e.g. planar:32:tanh or sylvester:8:orthogonal:m=2+radial:4")
    p.add_argument("--data", help="toy set, scikit-learn set (digits, iris, wine, breast_cancer) or a .npy/.csv file")
    p.add_argument("--energy", help="U1..U4 (U2-U4 confined in z1) or path/to/file.py:function")
    p.add_argument("--dim", type=int, default=2, help="dimension of a user energy (default 2)")
    p.add_argument("--n-data", type=int, default=None, help="points generated for toy sets (default 10000)")
    p.add_argument("--out", help="run directory")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--lr", type=_finite, default=defaults.lr)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--schedule", default=defaults.schedule, help="cosine or constant")
    p.add_argument("--clip", type=_finite, default=defaults.clip, help="max gradient norm (0: off)")
    p.add_argument("--val-fraction", type=_finite, default=defaults.val_fraction)
    p.add_argument("--patience", type=int, default=None, help="early stopping after this many worse validations")
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anneal", type=_finite, default=defaults.anneal,
                   help="reverse KL: share of the steps for the inverse-temperature warm-up 0.01 → 1 (0: off)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--kl-samples", type=int, default=100_000, help="samples for the final KL / ESS")
    p.add_argument("--no-plots", action="store_true", help="skip the figures")
    p.add_argument("--json", action="store_true", help="print one JSON object of results")
    p.set_defaults(func=_fit_command)

    p = sub.add_parser("sample", help="draw samples from a trained flow")
    p.add_argument("run", help="run directory")
    p.add_argument("-n", type=int, default=1000, help="number of samples")
    p.add_argument("--output", required=True, help="file to write (.npy or .csv)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_sample_command)

    p = sub.add_parser("eval", help="held-out NLL or KL(q‖p) and ESS of a trained flow")
    p.add_argument("run", help="run directory")
    p.add_argument("--data", help="score this .npy/.csv file instead (NLL, nats/dim)")
    p.add_argument("--kl-samples", type=int, default=100_000)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_eval_command)

    p = sub.add_parser("plot", help="figures of a run directory, or 'rezende' for Rezende & Mohamed's Figure 3")
    p.add_argument("run", help="run directory, or the word 'rezende'")
    p.add_argument("--out", help="where to write figures (default: the run directory; rezende-out for rezende)")
    p.add_argument("--steps", type=int, default=defaults.steps, help="rezende: steps per run")
    p.add_argument("--depths", default="2,8,32", help="rezende: comma-separated K")
    p.add_argument("--families", default="planar,radial", help="rezende: comma-separated layer families")
    p.add_argument("--energies", default="U1,U2,U3,U4", help="rezende: comma-separated energies")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plot_command)
