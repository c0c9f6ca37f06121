"""Targets and scored training runs shared by the command line, the demo and ``examples/``.

A *target* is named by a string: a data set (toy, scikit-learn, ``.npy``/``.csv``) for maximum
likelihood, or an energy (``U1``–``U4``, ``file.py:function``) for reverse KL. U2–U4 are always
the *confined* versions (:class:`~flowprobe.distributions.Confined`): the paper's formulas are not
normalisable, so their KL would be meaningless.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowprobe.data import TOY_SETS, load_data
from flowprobe.distributions import Energy, load_energy
from flowprobe.flow import Flow
from flowprobe.io import sha256_file
from flowprobe.metrics import LogPartition, gaussian_nll, kde_nll, log_partition, nll_per_dim, reverse_kl
from flowprobe.rundir import OutputDir, RunWriter
from flowprobe.spec import build_flow
from flowprobe.train import FitConfig, History, fit, split_data

__all__ = [
    "CONFINED_NOTE",
    "REZENDE_CAPTION",
    "Target",
    "check_scorable",
    "rezende_table",
    "score",
    "stage_log_prob",
    "table_markdown",
    "train_and_score",
    "user_file",
    "write_figures",
]

KL_SAMPLES = 100_000
TEST_SEED_OFFSET = 1_000_003
CONFINED_NOTE = "confined: U + ½((|z1|−4)₊/0.2)², since the paper's U2–U4 are not normalisable"
REZENDE_CAPTION = (
    f"U1 as in Rezende & Mohamed (2015); U2–U4 {CONFINED_NOTE}. "
    "KL(q‖p) = E_q[log q + U] + log Z, log Z by trapezoidal quadrature (error below 1e-6)."
)


@dataclasses.dataclass
class Target:
    """What a flow is fitted to.

    Attributes:
        kind: ``"data"`` or ``"energy"``.
        name: The name it was loaded from.
        dim: Dimension of the points.
        data: All points (``kind == "data"``).
        energy: The energy (``kind == "energy"``).
        n: Number of points generated for toy sets (``None``: default).
        seed: Seed of the data generator.
        sha256: SHA-256 of the user's file (data file or energy code), else ``None``.
    """

    kind: str
    name: str
    dim: int
    data: Tensor | None = None
    energy: Energy | None = None
    n: int | None = None
    seed: int = 0
    sha256: str | None = None
    _partition: LogPartition | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def load(cls, kind: str, name: str, n: int | None = None, seed: int = 0, dim: int = 2) -> Target:
        """Load a target (``dim`` only matters for a user's energy file).

        A user's file (``.npy``/``.csv`` data, ``file.py:function`` energy) is recorded by its
        absolute path and SHA-256, so a run can be evaluated from any directory and a changed file
        is noticed.
        """
        file = user_file(name)
        if file is not None:
            suffix = "" if name.lower().endswith((".npy", ".csv")) else ":" + name.rpartition(":")[2]
            name = str(file.resolve()) + suffix
        if kind == "data":
            data = load_data(name, n, seed)
            sha = sha256_file(file) if file is not None else None
            return cls("data", name, data.shape[1], data=data, n=n, seed=seed, sha256=sha)
        if kind == "energy":
            sha = sha256_file(file) if file is not None and file.is_file() else None
            energy = load_energy(name, dim)
            return cls("energy", name, energy.dim, energy=energy, seed=seed, sha256=sha)
        raise ValueError(f"target kind must be 'data' or 'energy', got {kind!r}")

    def to_json(self) -> dict[str, Any]:
        """What :meth:`load` needs to rebuild the target."""
        return {"kind": self.kind, "name": self.name, "n": self.n, "seed": self.seed, "dim": self.dim,
                "sha256": self.sha256}

    @property
    def is_toy(self) -> bool:
        """Whether the data are generated in code (so fresh test points exist)."""
        return self.kind == "data" and self.name in TOY_SETS

    def partition(self) -> LogPartition | None:
        """``log Z`` with its error estimate for 2-D energies (computed once), else ``None``.

        Raises:
            ValueError: an energy whose mass does not converge (:func:`~flowprobe.metrics.log_partition`).
        """
        if self.kind != "energy" or self.dim != 2:
            return None
        if self._partition is None:
            self._partition = log_partition(self.energy)  # type: ignore[arg-type]
        return self._partition

    def log_z(self) -> float | None:
        """``log Z`` of :meth:`partition`, else ``None``."""
        partition = self.partition()
        return None if partition is None else partition.value

    def test_data(self, val_fraction: float, fit_seed: int) -> tuple[str, Tensor]:
        """Held-out points: fresh samples for toy sets, else the validation split of the fit."""
        assert self.data is not None
        if self.is_toy:
            fresh = load_data(self.name, self.data.shape[0], self.seed + TEST_SEED_OFFSET)
            return "fresh test set", fresh
        _, val = split_data(self.data, val_fraction, fit_seed)
        if val is None:
            raise ValueError(f"no held-out points: a validation share of {val_fraction} of {self.data.shape[0]} rows "
                             "rounds to 0; give more rows or a larger --val-fraction")
        return "validation split", val


def user_file(name: str) -> Path | None:
    """The file of a target name that is the user's (``x.npy``, ``x.csv``, ``x.py:function``), else ``None``."""
    if name.lower().endswith((".npy", ".csv")):
        return Path(name)
    path, sep, function = name.rpartition(":")
    return Path(path) if sep and path.endswith(".py") and function else None


def write_figures(flow: Flow, target: Target, records: list[dict], out: OutputDir) -> list[str]:
    """Write ``training.png`` and, for 2-D flows, ``density.png`` (target vs. flow density and samples)
    and ``stages.png`` (source → after layer k → output, next to the data) into ``out``."""
    from flowprobe.plots import plot_density_comparison, plot_stages, plot_training_curve, save_figure

    log_z = target.log_z()
    offset, ylabel = (log_z, "KL(q‖p) estimate (nats)") if log_z is not None else (0.0, "loss")
    if target.kind == "data":
        ylabel = "NLL (nats/dim)"
    caption = f"\n{CONFINED_NOTE}" if target.name.lower() in ("u2", "u3", "u4") else ""
    curve = plot_training_curve(records, offset, ylabel, f"Training: {target.name}")
    paths = [save_figure(curve, out.claim("training.png"))]
    if flow.dim == 2:
        data = target.data
        if target.kind == "energy":
            energy = target.energy
            log_p = lambda x: -energy.energy(x) - log_z  # noqa: E731
            comparison = plot_density_comparison(flow, log_p, bound=4.0, title=f"{target.name}{caption}")
        else:
            bound = float(data.abs().max()) * 1.05
            comparison = plot_density_comparison(flow, data=data, bound=bound, title=f"{target.name}: data vs. flow")
        paths.append(save_figure(comparison, out.claim("density.png")))
        stages = plot_stages(flow, data=data, title="Source → after layer k → output")
        paths.append(save_figure(stages, out.claim("stages.png")))
    return [str(p) for p in paths]


@torch.no_grad()
def stage_log_prob(flow: Flow, x: Tensor, k: int) -> Tensor:
    """Exact log-density at ``x`` of stage ``k``: the push-forward of the source by the first ``k``
    layers, through their inverses (``k = 0``: the source itself)."""
    logdet = x.new_zeros(x.shape[:-1])
    for view in reversed(flow.layers[:k]):
        x, ld = view.inverse(x)
        logdet = logdet + ld
    return flow.base.log_prob(x) + logdet


def check_scorable(target: Target, config: FitConfig, samples: int = KL_SAMPLES) -> None:
    """Refuse, before any training, what :func:`score` would refuse after it.

    Raises:
        ValueError: no held-out points, a training split of lower rank than the dimension (constant or
            collinear columns, too few rows), fewer than 2 Monte-Carlo samples, or an energy whose
            ``log Z`` does not converge.
    """
    if target.kind == "energy":
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 2:
            raise ValueError(f"the KL needs at least 2 samples, got {samples!r}")
        target.partition()
        return
    assert target.data is not None
    train, _ = split_data(target.data, config.val_fraction, config.seed)
    target.test_data(config.val_fraction, config.seed)
    dim = train.shape[1]
    cov = torch.atleast_2d(torch.cov(train.T.to(torch.float64))) if len(train) > 1 else torch.zeros(dim, dim)
    rank = int(torch.linalg.matrix_rank(cov))
    if rank < dim:
        raise ValueError(f"the training split ({len(train)} rows) spans {rank} of {dim} dimensions (constant or "
                         "collinear columns, or too few rows): no density on R^d fits it and the Gaussian/KDE "
                         "references are undefined")


def score(flow: Flow, target: Target, config: FitConfig, samples: int = KL_SAMPLES) -> dict[str, Any]:
    """Metrics of a trained flow.

    * data: held-out NLL (nats/dim) of the flow, of the best single Gaussian (fitted to the
      training split) and of a Gaussian KDE (Scott's bandwidth) on the same split;
    * energy: KL(q‖p) with grid-quadrature ``log Z`` (2-D) and the ESS of importance weights;
      for other dimensions ``E_q[log q + U]`` (= KL − log Z) and the ESS.
    """
    if target.kind == "data":
        assert target.data is not None
        train, _ = split_data(target.data, config.val_fraction, config.seed)
        label, test = target.test_data(config.val_fraction, config.seed)
        return {
            "held_out": label,
            "n_test": test.shape[0],
            "nll_flow": nll_per_dim(flow, test),
            "nll_gaussian": gaussian_nll(train, test),
            "nll_kde": kde_nll(train, test),
            "unit": "nats/dim",
        }
    assert target.energy is not None
    partition = target.partition()
    log_z, error = (0.0, 0.0) if partition is None else (partition.value, partition.error)
    result = reverse_kl(flow, target.energy, log_z, n=samples, seed=config.seed, log_z_error=error)
    if partition is None:
        result["kl_minus_log_z"] = result.pop("kl")
        result["log_z"] = result["log_z_error"] = None
    return result


def train_and_score(
    spec: str,
    target: Target,
    config: FitConfig,
    out: Path | RunWriter | None = None,
    callback: Callable[[dict], None] | None = None,
    samples: int = KL_SAMPLES,
) -> tuple[Flow, History, dict[str, Any]]:
    """Build ``spec`` (seeded with ``config.seed``), fit it to ``target`` and score it (``samples`` for KL).

    ``out``: a new run directory, or an open :class:`~flowprobe.rundir.RunWriter`.
    """
    check_scorable(target, config, samples)
    torch.manual_seed(config.seed)
    flow = build_flow(spec, target.dim)
    dtype = str(next(flow.parameters()).dtype).removeprefix("torch.")
    meta = {"flow": spec, "dim": target.dim, "dtype": dtype, "target": target.to_json()}
    history = fit(flow, data=target.data, energy=target.energy, config=config, out=out, callback=callback, meta=meta)
    return flow, history, score(flow, target, config, samples)


def rezende_table(
    energies: Sequence[str] = ("U1", "U2", "U3", "U4"),
    families: Sequence[str] = ("planar", "radial"),
    depths: Sequence[int] = (2, 8, 32),
    config: FitConfig | None = None,
    progress: Callable[[str], None] | None = None,
    samples: int = KL_SAMPLES,
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], tuple[Flow, str]]]:
    """Rezende & Mohamed's Figure 3: fit every ``family:K`` to every energy by reverse KL.

    Args:
        energies: Names of the energies (rows).
        families: Layer families (planar with tanh).
        depths: Numbers of layers ``K``.
        config: Training settings (default :class:`FitConfig`).
        progress: Called with one line per finished run.
        samples: Monte-Carlo samples for each KL / ESS.

    Returns:
        ``(rows, flows)``: one row per run (energy, flow, K, KL, stderr, ESS, seconds) and the
        trained flows keyed by ``(energy, column name)`` for :func:`~flowprobe.plots.plot_flow_grid`.
    """
    config = config or FitConfig()
    rows, flows = [], {}
    for name in energies:
        target = Target.load("energy", name)
        for family in families:
            for k in depths:
                spec = f"{family}:{k}" + (":tanh" if family == "planar" else "")
                flow, history, metrics = train_and_score(spec, target, config, samples=samples)
                row = {"energy": name, "flow": family, "K": k, "steps": history.steps_done, **metrics,
                       "seconds": history.seconds}
                rows.append(row)
                flows[(name, f"{family} K={k}")] = (flow, f"KL={metrics['kl']:.3f}")
                if progress is not None:
                    progress(f"{name} {family} K={k}: KL={metrics['kl']:.4f} ± {metrics['kl_stderr']:.4f}, "
                             f"ESS={metrics['ess_fraction']:.3f} ({history.seconds:.0f} s)")
    return rows, flows


def table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The KL table of :func:`rezende_table` as Markdown: one row per energy, one column per flow."""
    columns = sorted({(r["flow"], r["K"]) for r in rows}, key=lambda c: (c[0], c[1]))
    energies = list(dict.fromkeys(r["energy"] for r in rows))
    kl = {(r["energy"], r["flow"], r["K"]): r["kl"] for r in rows}
    lines = ["| energy | " + " | ".join(f"{f} K={k}" for f, k in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for e in energies:
        cells = [f"{kl[(e, f, k)]:.4f}" if math.isfinite(kl.get((e, f, k), math.nan)) else "–" for f, k in columns]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
