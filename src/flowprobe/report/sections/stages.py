"""Section 1: a flow transforming a Gaussian stage by stage, with the exact density of every stage.

A planar flow is trained on one of Rezende & Mohamed's energies (reverse KL). For each chosen
stage ``k`` (the push-forward of ``N(0, I)`` by the first ``k`` layers) the section measures the
log-density of samples two ways — forward, ``log q(z) − Σ log|det J|``, and through the inverses of
the first ``k`` layers — its mass on a grid, and the KL from the stage to the target.
"""

from __future__ import annotations

import copy

import torch

from flowprobe.experiments import Target, stage_log_prob, train_and_score
from flowprobe.plots import density_grid, figure_png, plot_stages
from flowprobe.report.core import Context, Section, SectionOutput, check
from flowprobe.report.figures import density_row_figure
from flowprobe.train import FitConfig
from flowprobe.validation import validation

__all__ = ["SECTION", "grid_mass", "run"]

EXACTNESS_POINTS = 2000


def grid_mass(flow: torch.nn.Module, k: int, bound: float, points: int) -> float:
    """Mass of stage ``k`` on ``[−bound, bound]²`` by the midpoint rule on ``points²`` cells."""
    h = 2 * bound / points
    axis = -bound + h * (torch.arange(points, dtype=torch.float64) + 0.5)
    gx, gy = torch.meshgrid(axis, axis, indexing="ij")
    grid = torch.stack([gx.flatten(), gy.flatten()], -1)
    return sum(float(stage_log_prob(flow, chunk, k).exp().sum()) for chunk in grid.split(65_536)) * h * h


def run(ctx: Context) -> SectionOutput:
    s = ctx.settings
    target = Target.load("energy", s["energy"])
    config = FitConfig(steps=s["steps"], seed=ctx.seed, log_every=s["steps"])
    trained, history, metrics = train_and_score(s["flow"], target, config, samples=s["samples"])
    ctx.progress(f"trained {s['flow']} on {s['energy']}: KL = {metrics['kl']:.4f} in {history.seconds:.1f} s")
    flow = copy.deepcopy(trained).double()
    energy, log_z = target.energy, target.log_z()
    assert energy is not None and log_z is not None
    torch.manual_seed(ctx.seed)
    z = flow.base.sample(s["samples"])
    x, log_q = z, flow.base.log_prob(z)
    rows, panels = [], []
    with torch.no_grad(), validation(False):
        for k in range(flow.depth + 1):
            if k:
                x, logdet = flow.layers[k - 1](x)
                log_q = log_q - logdet
            if k not in s["stages"]:
                continue
            inverse = stage_log_prob(flow, x[:EXACTNESS_POINTS], k)
            terms = log_q + energy.energy(x) + log_z
            rows.append({"stage": k,
                         "max_log_density_difference": float((inverse - log_q[:EXACTNESS_POINTS]).abs().max()),
                         "mass_on_grid": grid_mass(flow, k, s["mass_bound"], s["mass_points"]),
                         "kl": float(terms.mean()), "kl_stderr": float(terms.std() / terms.numel() ** 0.5)})
            panels.append((f"stage {k}" if k else "stage 0: N(0, I)",
                           *density_grid(lambda p, k=k: stage_log_prob(flow, p, k), 4.0, s["figure_points"])))
    panels.append((f"target {s['energy']}", *density_grid(lambda p: -energy.energy(p) - log_z, 4.0,
                                                          s["figure_points"])))
    worst_exact = max(r["max_log_density_difference"] for r in rows)
    worst_mass = max(abs(r["mass_on_grid"] - 1) for r in rows)
    first, last = rows[0], rows[-1]
    checks = [
        check("max |log density forward − through the inverses| over stages", worst_exact, "≤", 1e-9),
        check(f"max |mass on [−{s['mass_bound']:g}, {s['mass_bound']:g}]² − 1| over stages", worst_mass, "≤",
              s["mass_tolerance"]),
        check(f"KL(stage {last['stage']} ‖ p)", last["kl"], "<", first["kl"], decisive=False,
              bound_name="KL(stage 0 ‖ p)"),
    ]
    measured = (f"{s['flow']} trained on {s['energy']} by reverse KL ({s['steps']} Adam steps). At stages "
                f"{', '.join(map(str, s['stages']))} (layers applied so far), in float64: the log-density of "
                f"{EXACTNESS_POINTS} samples forward (log q(z) − Σ log|det J|) against the same density through the "
                f"inverses of those layers; the stage's mass by the midpoint rule on {s['mass_points']}² cells; and "
                f"KL(stage ‖ p) = E[log q_k + U] + log Z from {s['samples']} samples (log Z by quadrature).")
    stages_png = figure_png(plot_stages(flow, max_panels=len(s["stages"]),
                                        title="Samples stage by stage (colour: first source coordinate)"))
    densities_png = figure_png(density_row_figure(panels, "Exact density of each stage (through the inverses)"))
    return SectionOutput(
        measured,
        {"stages": rows, "final_kl": metrics["kl"], "final_kl_stderr": metrics["kl_stderr"],
         "ess_fraction": metrics["ess_fraction"], "log_z": log_z, "training_seconds": history.seconds},
        checks,
        {"densities": (densities_png, "The density after 0, …, K layers, evaluated exactly through the inverses, "
                                      "next to the target."),
         "samples": (stages_png, "Samples of N(0, I) carried through the layers.")},
        {"max_log_density_difference": "max |log q forward − inverse|", "kl": "KL(stage ‖ p)",
         "kl_stderr": "KL s.e.", "final_kl": "KL(q‖p) of the trained flow",
         "ess_fraction": "ESS fraction", "log_z": "log Z (quadrature)"},
    )


SECTION = Section(
    key="stages",
    number=1,
    title="A flow transforms a Gaussian stage by stage",
    claim="A normalizing flow is a composition of invertible layers, so every intermediate stage of the "
          "transformation of N(0, I) has an exact density that the inverses evaluate.",
    run=run,
    settings={
        "quick": {"flow": "planar:16:tanh", "energy": "U1", "steps": 2000, "stages": [0, 2, 4, 8, 16],
                  "samples": 20_000, "mass_bound": 8.0, "mass_points": 301, "mass_tolerance": 1e-2,
                  "figure_points": 100},
        "full": {"flow": "planar:32:tanh", "energy": "U1", "steps": 20_000, "stages": [0, 1, 2, 4, 8, 16, 32],
                 "samples": 100_000, "mass_bound": 8.0, "mass_points": 801, "mass_tolerance": 1e-3,
                 "figure_points": 200},
    },
)
