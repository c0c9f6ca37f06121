"""Section 7: Rezende & Mohamed's Figure 3, the four 2-D energies U1–U4 fitted by planar and radial
flows of growing length, with ``KL(q‖p)`` per panel (:func:`flowprobe.experiments.rezende_table`).

U2–U4 are the confined versions (:data:`~flowprobe.experiments.CONFINED_NOTE`): as printed they are
not normalisable and their KL would be meaningless.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from flowprobe.experiments import REZENDE_CAPTION, Target, rezende_table
from flowprobe.plots import figure_png, plot_flow_grid
from flowprobe.report.core import Context, Section, SectionOutput, check
from flowprobe.train import FitConfig

__all__ = ["SECTION", "run"]


def _log_density(target: Target) -> Callable[[Tensor], Tensor]:
    energy, log_z = target.energy, target.log_z()
    assert energy is not None and log_z is not None
    return lambda x: -energy.energy(x) - log_z


def run(ctx: Context) -> SectionOutput:
    s = ctx.settings
    config = FitConfig(steps=s["steps"], seed=ctx.seed, log_every=s["steps"])
    rows, flows = rezende_table(s["energies"], s["families"], s["depths"], config, progress=ctx.progress,
                                samples=s["samples"])
    shallow, deep = min(s["depths"]), max(s["depths"])

    def best(energy: str, k: int) -> float:
        return min(r["kl"] for r in rows if r["energy"] == energy and r["K"] == k)

    gains = [{"energy": e, f"best_kl_k{shallow}": best(e, shallow), f"best_kl_k{deep}": best(e, deep)}
             for e in s["energies"]]
    kl = {(r["energy"], r["flow"], r["K"]): r for r in rows}
    worse = [(e, f) for e in s["energies"] for f in s["families"]
             if kl[(e, f, deep)]["kl"] > kl[(e, f, shallow)]["kl"] + 3 * kl[(e, f, shallow)]["kl_stderr"]]
    checks = [
        check(f"energies where the best K = {deep} flow is not better than the best K = {shallow} flow",
              float(sum(g[f"best_kl_k{deep}"] >= g[f"best_kl_k{shallow}"] for g in gains)), "≤", 0),
        check(f"(energy, family) pairs where K = {deep} is worse than K = {shallow} by more than 3 s.e.",
              float(len(worse)), "≤", 0, decisive=False),
    ]
    columns = [f"{f} K={k}" for f in s["families"] for k in s["depths"]]
    grid = [(name, _log_density(Target.load("energy", name))) for name in s["energies"]]
    figure = plot_flow_grid(grid, columns, flows, points=s["figure_points"], caption=REZENDE_CAPTION,
                            title=f"Rezende & Mohamed, Figure 3: reverse KL, {s['steps']} steps each (KL in nats)")
    measured = (f"Every flow {', '.join(s['families'])} with K ∈ {s['depths']} layers (planar with tanh) trained on "
                f"each of {', '.join(s['energies'])} by reverse KL ({s['steps']} Adam steps, inverse temperature "
                f"warm-up), then KL(q‖p) = E_q[log q + U] + log Z from {s['samples']} samples with its standard "
                "error (log Z by quadrature) and the effective sample size of the importance weights. "
                + REZENDE_CAPTION)
    table = [{"energy": r["energy"], "flow": r["flow"], "K": r["K"], "kl": r["kl"], "kl_stderr": r["kl_stderr"],
              "ess_fraction": r["ess_fraction"], "seconds": r["seconds"]} for r in rows]
    log_z = {name: next(r["log_z"] for r in rows if r["energy"] == name) for name in s["energies"]}
    return SectionOutput(
        measured,
        {"runs": table, "best_by_depth": gains, "log_z": log_z},
        checks,
        {"figure3": (figure_png(figure), "Target densities (left) and the flows' exact densities (through the "
                                         "inverses), KL per panel.")},
        {"kl": "KL(q‖p)", "kl_stderr": "KL s.e.", "ess_fraction": "ESS fraction", "seconds": "training s",
         f"best_kl_k{shallow}": f"best KL, K = {shallow}", f"best_kl_k{deep}": f"best KL, K = {deep}",
         "log_z": "log Z (quadrature)", "best_by_depth": "best KL by depth"},
    )


SECTION = Section(
    key="rezende",
    number=7,
    title="Rezende & Mohamed's U1–U4 grid",
    claim="Longer flows fit Rezende & Mohamed's 2-D energies better: on every energy the best flow with 32 "
          "layers has a lower KL(q‖p) than the best with 2 (their Figure 3).",
    run=run,
    settings={
        "quick": {"energies": ["U1", "U2", "U3", "U4"], "families": ["planar", "radial"], "depths": [2, 8, 32],
                  "steps": 1500, "samples": 20_000, "figure_points": 80},
        "full": {"energies": ["U1", "U2", "U3", "U4"], "families": ["planar", "radial"], "depths": [2, 8, 32],
                 "steps": 20_000, "samples": 100_000, "figure_points": 150},
    },
)
