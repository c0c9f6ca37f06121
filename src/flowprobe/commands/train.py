"""``flowprobe fit | sample | eval | plot``: train, evaluate and look at flows from the command line.

A run directory (``--out DIR``) holds ``config.json`` (flow spec, target, settings),
``weights.safetensors``, ``history.jsonl``, the last checkpoint and the figures
(:mod:`flowprobe.rundir`: one writer at a time, nothing replaced that flowprobe did not write).
Commands that read a run build the flow from the spec and load tensors with safetensors: nothing
is unpickled, and a user's energy code recorded in the run is imported only when the user names it
again (``--energy FILE.py:NAME``, checked against its recorded SHA-256) or passes ``--trust-code``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import Tensor

from flowprobe.cli import add_parser, check_finite
from flowprobe.cli import finite_float as _finite
from flowprobe.cli import positive_int as _positive_int
from flowprobe.experiments import (
    REZENDE_CAPTION,
    Target,
    check_scorable,
    rezende_table,
    score,
    table_markdown,
    user_file,
    write_figures,
)
from flowprobe.io import atomic_write, sha256_file, write_json
from flowprobe.metrics import nll_per_dim
from flowprobe.rundir import OutputDir, RunWriter, load_run, run_config
from flowprobe.spec import build_flow, default_spec, parse_source, parse_spec
from flowprobe.train import FitConfig, fit
from flowprobe.validation import check_memory

__all__ = ["add_commands"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
FIT_DEFAULTS = {"dim": 2, "checkpoint_every": 1000, "seed": 0, "dtype": "float32"}
"""Defaults of ``fit`` options that are not :class:`FitConfig` fields (the parser's are ``None``, so
that a resume can tell an option given on the command line from one left alone)."""
SAMPLE_BYTES = 4 * 8  # per sample and dimension: the float64 copy, its text or .npy, and the flow's own
MAX_REFLECTIONS = 4096
MAX_HIDDEN = 4096


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


def _fit_config(settings: dict[str, Any]) -> FitConfig:
    fields = set(FitConfig.__dataclass_fields__)
    try:
        return FitConfig(**{k: v for k, v in settings.items() if k in fields})
    except TypeError as err:
        raise ValueError(f"bad training settings in the run: {err}") from None


def _run_target(run: Path, config: dict[str, Any], args: argparse.Namespace) -> Target:
    """The target recorded in a run, loaded without importing code the user did not name again.

    Raises:
        ValueError: a user's energy not named again (and no ``--trust-code``), a file that changed since
            the run (SHA-256), a malformed target record.
    """
    t = config.get("target")
    if t is None:
        raise ValueError(f"{run / 'config.json'} records no target (a run trained from Python)")
    try:
        kind, name, n, seed, dim, sha = t["kind"], t["name"], t["n"], t["seed"], t["dim"], t.get("sha256")
    except KeyError as err:
        raise ValueError(f"{run / 'config.json'}: the target record lacks {err}") from None
    if not isinstance(name, str) or kind not in ("data", "energy"):
        raise ValueError(f"{run / 'config.json'}: bad target record {t!r}")
    file = user_file(name)
    named = getattr(args, "energy", None) if kind == "energy" else None
    if file is None:
        return Target.load(kind, name, n, seed, dim)
    if kind == "energy":
        if named is None and not getattr(args, "trust_code", False):
            raise ValueError(f"this run's energy is Python code ({name}); flowprobe imports it only if you name it "
                             f"again (--energy {name}) or pass --trust-code")
        if named is not None:
            if user_file(named) is None or named.rpartition(":")[2] != name.rpartition(":")[2]:
                raise ValueError(f"--energy {named} is not the run's energy {name}")
            file, name = user_file(named), named
    if not file.is_file():
        raise FileNotFoundError(f"the run's {'energy' if kind == 'energy' else 'data'} file is missing: {file}")
    if sha is None or sha256_file(file) != sha:
        raise ValueError(f"{file} changed since the run was trained (its SHA-256 differs from the recorded one); "
                         "refusing to use it")
    return Target.load(kind, name, n, seed, dim)


def _emit(args: argparse.Namespace, result: dict[str, Any], lines: list[str]) -> None:
    check_finite(result)
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
            f"  flow − Gaussian {metrics['nll_flow'] - metrics['nll_gaussian']:+.4f} (negative: the flow is better)",
        ]
    kl = metrics.get("kl")
    head = (f"KL(q‖p) = {kl:.4f} ± {metrics['kl_stderr']:.4f} nats (Monte-Carlo standard error; log Z = "
            f"{metrics['log_z']:.6f} ± {metrics['log_z_error']:.1g} by quadrature)") if kl is not None else (
        f"E_q[log q + U] = {metrics['kl_minus_log_z']:.4f} ± {metrics['kl_stderr']:.4f} (no log Z outside 2-D)")
    return [head, f"ESS of importance weights: {metrics['ess_fraction']:.3f} of the samples"]


# -- fit ----------------------------------------------------------------------------------------------

_RUN_FLAGS = ("steps", "lr", "batch_size", "schedule", "clip", "val_fraction", "patience", "log_every",
              "checkpoint_every", "seed", "anneal", "init_source")


def _clip(value: float | None) -> float | None:
    return None if value == 0 else value


def _check_spec_size(spec: str) -> None:
    """Refuse layer options whose size cannot be built or run (the spec grammar has no caps for them)."""
    for family, _, options in parse_spec(spec):
        for key, cap in (("reflections", MAX_REFLECTIONS), ("hidden", MAX_HIDDEN)):
            if options.get(key, 1) > cap:
                raise ValueError(f"flow spec: {family} option {key}={options[key]} exceeds the limit of {cap}")


def _resume_conflicts(args: argparse.Namespace, run: Path, config: dict[str, Any]) -> None:
    """Refuse options of ``fit --resume`` that differ from the run's (a resume keeps the run's settings)."""
    t = config.get("target", {})
    recorded = {"init_source": False} | dict(config["fit"]) | {
        "dtype": config.get("dtype", "float32"), "flow": config["flow"], "dim": t.get("dim"), "n_data": t.get("n")}
    given = {"clip": _clip(args.clip)} if args.clip is not None else {}
    given |= {k: getattr(args, k) for k in (*_RUN_FLAGS, "dtype", "flow", "dim", "n_data")
              if k != "clip" and getattr(args, k) is not None}
    for key, value in given.items():
        if value != recorded.get(key):
            raise ValueError(f"--{key.replace('_', '-')} {value} conflicts with the run's {recorded.get(key)!r}; "
                             "a resumed run keeps its own settings")
    if args.out is not None and Path(args.out).resolve() != run.resolve():
        raise ValueError(f"--out {args.out} conflicts with --resume {run}; a run is resumed in its own directory")
    if args.overwrite:
        raise ValueError("--overwrite and --resume exclude each other")
    if args.data is not None:
        file = user_file(args.data)
        same = (str(file.resolve()) if file is not None else args.data) == t.get("name")
        if t.get("kind") != "data" or not same:
            raise ValueError(f"--data {args.data} conflicts with the run's target {t.get('name')!r}")
    if args.energy is not None:
        recorded_name = t.get("name") if isinstance(t.get("name"), str) else ""
        if user_file(args.energy) is not None:  # naming the run's file again: same function, checked by SHA-256
            same = user_file(recorded_name) is not None and \
                args.energy.rpartition(":")[2] == recorded_name.rpartition(":")[2]
        else:
            same = args.energy == recorded_name
        if t.get("kind") != "energy" or not same:
            raise ValueError(f"--energy {args.energy} conflicts with the run's target {recorded_name!r}")


def _new_run(args: argparse.Namespace) -> tuple[str, str, Target, FitConfig]:
    if (args.data is None) == (args.energy is None) or args.out is None:
        raise ValueError("fit needs --out and exactly one of --data or --energy (or --resume DIR)")
    if args.flow is None and args.energy is not None:
        raise ValueError("fit --energy needs --flow (only data have a default flow)")
    if args.trust_code:
        raise ValueError("--trust-code applies to --resume (a new run imports only the --energy you name)")
    if args.flow is not None:
        parse_spec(args.flow)
        _check_spec_size(args.flow)
    value = {k: getattr(args, k) for k in (*_RUN_FLAGS, "dim", "dtype")}
    defaults = {f.name: f.default for f in FitConfig.__dataclass_fields__.values()} | FIT_DEFAULTS
    value = {k: defaults[k] if v is None else v for k, v in value.items()}
    kind, name = ("data", args.data) if args.data is not None else ("energy", args.energy)
    target = Target.load(kind, name, args.n_data, value["seed"], value["dim"])
    spec = args.flow
    if spec is None:
        spec = default_spec(target.dim)
        print(f"flowprobe fit: no --flow given; using {spec}, the default for data of dimension {target.dim}",
              file=sys.stderr)
    if args.init_source is None:  # a Gaussian source starts at the training split's moments unless told otherwise
        value["init_source"] = kind == "data" and parse_source(spec) != "normal"
    config = FitConfig(
        steps=value["steps"], lr=value["lr"], batch_size=value["batch_size"], schedule=value["schedule"],
        clip=_clip(value["clip"]), val_fraction=value["val_fraction"] if kind == "data" else 0.0,
        patience=value["patience"], log_every=value["log_every"], checkpoint_every=value["checkpoint_every"],
        seed=value["seed"], anneal=value["anneal"], init_source=value["init_source"],
    )
    return spec, value["dtype"], target, config


def _fit_command(args: argparse.Namespace) -> int:
    if args.resume:
        out = Path(args.resume)
        config_json = run_config(out)
        _resume_conflicts(args, out, config_json)
        spec, dtype = config_json["flow"], config_json.get("dtype", "float32")
        target = _run_target(out, config_json, args)
        config = _fit_config(config_json["fit"])
        mode = "resume"
    else:
        spec, dtype, target, config = _new_run(args)
        out = Path(args.out)
        mode = "overwrite" if args.overwrite else "new"
    check_scorable(target, config, args.kl_samples)
    torch.manual_seed(config.seed)
    flow = build_flow(spec, target.dim, DTYPES[dtype])
    meta = {"flow": spec, "dim": target.dim, "dtype": dtype, "target": target.to_json()}
    log_z = target.log_z()
    every = config.log_every * max(1, config.steps // 20 // config.log_every)
    progress = Progress(config.steps, offset=log_z or 0.0, every=every)
    with RunWriter(out, mode) as run:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = fit(flow, data=target.data, energy=target.energy, config=config, out=run, callback=progress,
                          meta=meta)
        for warning in caught:  # e.g. how the source's moment initialisation was regularised
            print(f"flowprobe fit: note: {warning.message}", file=sys.stderr)
        metrics = score(flow, target, config, samples=args.kl_samples)
        figures = [] if args.no_plots else write_figures(flow, target, history.records, run)
        result = {"out": str(out), "flow": spec, "target": target.name, **history.summary(), "metrics": metrics,
                  "figures": figures}
        run.write_json("results.json", result)
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
    output = Path(args.output)
    if output.suffix not in (".npy", ".csv"):
        raise ValueError(f"--output must end in .npy or .csv, got {output.name!r}")
    if (output.exists() or output.is_symlink()) and not args.overwrite:
        raise ValueError(f"{output} exists; pass --overwrite to replace it")
    flow, _ = load_run(args.run)
    check_memory(SAMPLE_BYTES * args.n * flow.dim, f"-n {args.n} samples of dimension {flow.dim}")
    torch.manual_seed(args.seed)
    x = flow.sample(args.n).to(torch.float64).cpu().numpy()
    atomic_write(output, lambda tmp: _write_array(tmp, x, output.suffix))
    result = {"file": str(output), "n": args.n, "dim": flow.dim, "mean": x.mean(0).tolist(), "std": x.std(0).tolist()}
    _emit(args, result, [f"wrote {args.n} samples of dimension {flow.dim} to {output}"])
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    from flowprobe.data import load_array

    run = Path(args.run)
    flow, config = load_run(run)
    if args.data is not None:
        x = load_array(args.data, dim=flow.dim)
        metrics = {"data": args.data, "n": x.shape[0], "nll_flow": nll_per_dim(flow, x), "unit": "nats/dim"}
        lines = [f"NLL of {args.data} ({x.shape[0]} points): {metrics['nll_flow']:.4f} nats/dim"]
    else:
        target = _run_target(run, config, args)
        metrics = score(flow, target, _fit_config(config["fit"]), samples=args.kl_samples)
        lines = _metric_lines(metrics)
    _emit(args, {"run": args.run, "metrics": metrics}, lines)
    return 0


def _read_history(path: Path) -> list[dict]:
    """The records of ``history.jsonl`` (a run in progress may be writing its last line)."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def _plot_command(args: argparse.Namespace) -> int:
    if args.run == "rezende":
        return _rezende_command(args)
    run = Path(args.run)
    flow, config = load_run(run)
    target = _run_target(run, config, args)
    with OutputDir(Path(args.out) if args.out else run, "plot") as out:
        figures = write_figures(flow, target, _read_history(run / "history.jsonl"), out)
    _emit(args, {"figures": figures}, [f"wrote {f}" for f in figures])
    return 0


def _normalised(target: Target) -> Callable[[Tensor], Tensor]:
    energy, log_z = target.energy, target.log_z()
    return lambda x: -energy.energy(x) - log_z


def _rezende_command(args: argparse.Namespace) -> int:
    from flowprobe.plots import plot_flow_grid, save_figure

    try:
        depths = [int(k) for k in args.depths.split(",")]
    except ValueError:
        raise ValueError(f"--depths must be comma-separated integers, got {args.depths!r}") from None
    families = args.families.split(",")
    for family, k in ((f, k) for f in families for k in depths):
        parse_spec(f"{family}:{k}")
    energies = args.energies.split(",")
    targets = [Target.load("energy", e) for e in energies]
    config = FitConfig(steps=args.steps, seed=args.seed)
    with OutputDir(Path(args.out or "rezende-out"), "plot rezende") as out:
        for name in ("figure3.png", "table.json", "table.md"):
            out.claim(name)
        rows, flows = rezende_table(energies, families, depths, config, progress=lambda s: print(s, file=sys.stderr))
        columns = [f"{f} K={k}" for f in families for k in depths]
        grid = [(t.name, _normalised(t)) for t in targets]
        title = f"Rezende & Mohamed Figure 3: reverse KL, {args.steps} steps each (KL(q‖p) in nats)"
        figure = plot_flow_grid(grid, columns, flows, title=title, caption=REZENDE_CAPTION)
        figure = save_figure(figure, out.claim("figure3.png"))
        table = table_markdown(rows)
        write_json(out.claim("table.json"), {"rows": rows, "caption": REZENDE_CAPTION, "steps": args.steps})
        atomic_write(out.claim("table.md"), lambda tmp: Path(tmp).write_text(table + "\n\n" + REZENDE_CAPTION + "\n"))
    _emit(args, {"rows": rows, "figure": str(figure)}, [table, "", REZENDE_CAPTION, f"figure: {figure}"])
    return 0


def _non_negative(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``fit``, ``sample``, ``eval`` and ``plot``."""
    defaults = FitConfig()
    p = add_parser(sub, "fit")
    p.add_argument("--flow", help="flow spec, e.g. planar:32:tanh, sylvester:8:orthogonal:m=2+radial:4 or "
                   "gaussian:full>planar:8 (a trainable source first); default for --data: chosen by dimension")
    p.add_argument("--data", help="toy set, scikit-learn set (digits, iris, wine, breast_cancer) or a .npy/.csv file")
    p.add_argument("--energy", help="U1..U4 (U2-U4 confined in z1) or path/to/file.py:function")
    p.add_argument("--dim", type=_positive_int, help="dimension of a user energy (default 2)")
    p.add_argument("--n-data", type=_positive_int, default=None, help="points generated for toy sets (default 10000)")
    p.add_argument("--out", help="run directory (new or empty; see --overwrite and --resume)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out once the new one has written its first checkpoint "
                        "(files flowprobe did not write are kept)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--trust-code", action="store_true",
                   help="with --resume: import the energy file recorded in the run (checked against its SHA-256)")
    p.add_argument("--steps", type=_positive_int, help=f"Adam steps (default {defaults.steps})")
    p.add_argument("--lr", type=_finite, help=f"peak learning rate (default {defaults.lr})")
    p.add_argument("--batch-size", type=_positive_int, help=f"points per step (default {defaults.batch_size})")
    p.add_argument("--schedule", choices=("cosine", "constant"), help="learning-rate schedule (default cosine)")
    p.add_argument("--clip", type=_non_negative, help=f"max gradient norm (0: off; default {defaults.clip})")
    p.add_argument("--val-fraction", type=_finite, help=f"validation share (default {defaults.val_fraction})")
    p.add_argument("--patience", type=_positive_int, help="early stopping after this many worse validations")
    p.add_argument("--log-every", type=_positive_int, help=f"steps per history record (default {defaults.log_every})")
    p.add_argument("--checkpoint-every", type=_positive_int, help="steps between checkpoints (default 1000)")
    p.add_argument("--seed", type=int, help="seed of everything random (default 0)")
    p.add_argument("--anneal", type=_finite,
                   help="reverse KL: share of the steps for the inverse-temperature warm-up 0.01 → 1 (0: off; "
                        f"default {defaults.anneal})")
    p.add_argument("--init-source", action=argparse.BooleanOptionalAction, default=None,
                   help="data: start the layers at the identity and a Gaussian source (gaussian:full>… or "
                        "gaussian:diag>…) at the training split's moments (default: on for such sources)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="float32 (default) or float64")
    p.add_argument("--kl-samples", type=_positive_int, default=100_000, help="samples for the final KL / ESS")
    p.add_argument("--no-plots", action="store_true", help="skip the figures")
    p.add_argument("--json", action="store_true", help="print one JSON object of results")
    p.set_defaults(func=_fit_command)

    code = "a run's energy file: name it again (checked against its recorded SHA-256)"
    p = add_parser(sub, "sample")
    p.add_argument("run", help="run directory")
    p.add_argument("-n", type=_positive_int, default=1000, help="number of samples")
    p.add_argument("--output", required=True, help="file to write (.npy or .csv)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_sample_command)

    p = add_parser(sub, "eval")
    p.add_argument("run", help="run directory")
    p.add_argument("--data", help="score this .npy/.csv file instead (NLL, nats/dim)")
    p.add_argument("--energy", metavar="FILE.py:NAME", help=code)
    p.add_argument("--trust-code", action="store_true", help="import the run's recorded energy file")
    p.add_argument("--kl-samples", type=_positive_int, default=100_000)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_eval_command)

    p = add_parser(sub, "plot")
    p.add_argument("run", help="run directory, or the word 'rezende'")
    p.add_argument("--out", help="where to write figures (default: the run directory; rezende-out for rezende)")
    p.add_argument("--energy", metavar="FILE.py:NAME", help=code)
    p.add_argument("--trust-code", action="store_true", help="import the run's recorded energy file")
    p.add_argument("--steps", type=_positive_int, default=defaults.steps, help="rezende: steps per run")
    p.add_argument("--depths", default="2,8,32", help="rezende: comma-separated K")
    p.add_argument("--families", default="planar,radial", help="rezende: comma-separated layer families")
    p.add_argument("--energies", default="U1,U2,U3,U4", help="rezende: comma-separated energies")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plot_command)
