"""Section 4: topology matching with smooth activations (result 2; ``docs/theory/topology.md`` §2–3, §5).

* The blog's "q, p, L" rows: one tanh planar layer (``M = 1``) makes ``L`` a ridge function.
* The gradient-rank table: for exact pairs ``p = f#q`` the gradients of ``L`` span at most ``M``
  dimensions (inside ``span(B)``); for a pair the flow does not map exactly, they need not.
* The Gaussian neuron bound ``max(n₊, n₋)`` of ``Σ_q⁻¹ − Σ_p⁻¹`` for a few pairs, and the isotropic
  split ``N(0, I_d) → N(0, σ²I_d)``: Sylvester flows trained with ``M`` below, at and above ``d``,
  their TV with its interval next to the proven floor.
"""

from __future__ import annotations

import torch

from flowprobe.distributions import DiagonalNormal
from flowprobe.plots import figure_png
from flowprobe.report.core import Context, Section, SectionOutput, check
from flowprobe.report.figures import floor_figure
from flowprobe.spec import build_flow
from flowprobe.theory import topology as tp
from flowprobe.theory.topology_experiments import isotropic_split_experiment
from flowprobe.theory.topology_figures import ridge_figure

__all__ = ["SECTION", "rank_rows", "run"]

RANK_FLOWS = (  # (dimension, flow spec): residual stacks with fewer neurons than dimensions
    (4, "planar:1:tanh"),
    (5, "sylvester:2:orthogonal:m=1:tanh"),
    (8, "sylvester:1:orthogonal:m=2:tanh+planar:1:tanh"),
)
MISMATCH_SCALE = 1.5  # the target N(0, 1.5² I) of the mismatched row
GAUSSIAN_PAIRS = (  # (name, variances of Σ_p) against Σ_q = I
    ("Σ_p = diag(2, 0.5, 1)", [2.0, 0.5, 1.0]),
    ("Σ_p = diag(2, 3, 1.5)", [2.0, 3.0, 1.5]),
    ("Σ_p = diag(0.5, 0.5, 2, 2)", [0.5, 0.5, 2.0, 2.0]),
)


def _random_flow(spec: str, dim: int, seed: int) -> torch.nn.Module:
    """``spec`` in float64 with every parameter moved away from the initialisation."""
    torch.manual_seed(seed)
    flow = build_flow(spec, dim, torch.float64)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return flow


def rank_rows(points: int, seed: int) -> list[dict]:
    """One row per exact pair of :data:`RANK_FLOWS`, and the last flow against ``N(0, 1.5² I)``."""
    rows = []
    for dim, spec in RANK_FLOWS:
        flow = _random_flow(spec, dim, seed)
        rows.append(_rank_row(f"{spec}, p = f#q", flow, None, points, exact=True))
    zeros = torch.zeros(dim, dtype=torch.float64)
    mismatch = DiagonalNormal(zeros, torch.full_like(zeros, MISMATCH_SCALE))
    rows.append(_rank_row(f"{spec}, p = N(0, {MISMATCH_SCALE}² I)", flow, mismatch, points, exact=False))
    return rows


def _rank_row(pair: str, flow: torch.nn.Module, target: object, points: int, exact: bool) -> dict:
    report = tp.gradient_set(flow, flow.base.sample(points), target)
    return {"pair": pair, "exact_pair": exact, "dim": flow.dim, "neurons": report.neurons, "rank": report.rank,
            "span_b_dim": report.subspace_dim, "relative_outside_residual": report.relative_outside_residual,
            "singular_values": report.singular_values}


def run(ctx: Context) -> SectionOutput:
    s = ctx.settings
    ranks = rank_rows(s["rank_points"], ctx.seed)
    ctx.progress("gradient ranks done")
    bounds = []
    for name, variances in [(f"Σ_p = {s['scale']:g}² I_{s['dim']}", [s["scale"] ** 2] * s["dim"]), *GAUSSIAN_PAIRS]:
        bound = tp.gaussian_neuron_bound(torch.eye(len(variances), dtype=torch.float64),
                                         torch.diag(torch.tensor(variances, dtype=torch.float64)))
        bounds.append({"pair": f"Σ_q = I, {name}", "n_plus": bound.positive, "n_minus": bound.negative,
                       "min_neurons": bound.min_neurons})
    runs = []
    for r in isotropic_split_experiment(s["dim"], s["scale"], s["neurons"], s["seeds"], s["steps"],
                                        samples=s["samples"]):
        runs.append({"neurons": r.neurons, "layers": r.layers, "seed": r.seed, "kl": r.kl, "kl_stderr": r.kl_stderr,
                     "kl_floor": r.kl_floor, "tv": float(r.tv.estimate), "tv_low": float(r.tv.low),
                     "tv_high": float(r.tv.high), "tv_floor": r.tv_floor})
        ctx.progress(f"split M = {r.neurons}, seed {r.seed}: TV = {runs[-1]['tv']:.4f} (floor {r.tv_floor:.4f})")
    d = s["dim"]
    floors = []
    for m in range(max(s["neurons"]) + 1):
        tv, kl = tp.isotropic_floor(d, m, s["scale"])
        floors.append({"neurons": m, "tv_floor": tv, "kl_floor": kl})
    below = [r for r in runs if r["neurons"] < d]
    reachable = [r for r in runs if r["neurons"] >= d]
    exact = [r for r in ranks if r["exact_pair"]]
    mismatch = next(r for r in ranks if not r["exact_pair"])
    checks = [
        check("exact pairs: max (rank − M)", float(max(r["rank"] - r["neurons"] for r in exact)), "≤", 0),
        check("exact pairs: max |∇L outside span(B)| / max |∇L|", max(r["relative_outside_residual"] for r in exact),
              "≤", 1e-8),
        check(f"M < d = {d}: min (upper end of the TV interval − floor)",
              min(r["tv_high"] - r["tv_floor"] for r in below), "≥", 0),
        check("M ≥ d: best TV", min(r["tv"] for r in reachable), "<", floors[d - 1]["tv_floor"], decisive=False,
              bound_name=f"floor at M = {d - 1}"),
        check("mismatched pair: rank − M", float(mismatch["rank"] - mismatch["neurons"]), ">", 0, decisive=False),
    ]
    measured = (f"Gradient ranks: random tanh residual stacks in float64, L(z) = log p(f(z)) − log q(z) and its "
                f"gradient by autograd at {s['rank_points']} source samples, numerical rank of the gradient matrix "
                "(singular values above max(N, d)·ε·σ_max) against the neuron count M, and the part of the gradients "
                "outside span(B). Gaussian pairs: the signature of Σ_q⁻¹ − Σ_p⁻¹. Isotropic split: orthogonal "
                f"Sylvester flows (identity activation) from N(0, I_{d}) to N(0, {s['scale']:g}² I_{d}) with M "
                f"neurons, trained by reverse KL ({s['steps']} Adam steps, seeds {s['seeds']}), TV estimated from "
                f"{s['samples']} samples per side with its 95% empirical-Bernstein interval, against the proven floor "
                "TV(N(0, I_n), N(0, σ²I_n)), n = d − M.")
    figures = {
        "ridge": (figure_png(ridge_figure(s["ridge_grid"])),
                  "The blog's q, p, L rows: one tanh planar layer (M = 1) makes L a ridge function (contours "
                  "orthogonal to w)."),
        "floor": (figure_png(floor_figure(runs, floors, d, f"N(0, I_{d}) → N(0, {s['scale']:g}² I_{d})")),
                  "Reached TV against M with the proven floor: below M = d no flow can go under it."),
    }
    return SectionOutput(
        measured,
        {"gradient_ranks": ranks, "gaussian_bounds": bounds, "split_runs": runs, "floors": floors},
        checks,
        figures,
        {"neurons": "M", "span_b_dim": "dim span(B)", "relative_outside_residual": "|∇L outside span(B)| (rel.)",
         "n_plus": "n₊", "n_minus": "n₋", "min_neurons": "minimum M", "kl": "KL", "kl_stderr": "KL s.e.",
         "tv": "TV", "tv_low": "TV low", "tv_high": "TV high", "tv_floor": "TV floor", "kl_floor": "KL floor",
         "split_runs": "isotropic split: trained Sylvester flows", "floors": "proven floors",
         "gaussian_bounds": "Gaussian pairs: minimum neuron count"},
    )


SECTION = Section(
    key="topology",
    number=4,
    title="Topology matching with smooth activations",
    claim="If residual layers with M neurons in total map q exactly onto p, the gradients of "
          "L = log p∘f − log q span at most M dimensions: N(0, I_d) → N(0, σ²I_d) needs M ≥ d, and with fewer "
          "neurons the TV cannot fall under a proven floor.",
    run=run,
    settings={
        "quick": {"rank_points": 200, "dim": 3, "scale": 1.5, "neurons": [1, 2, 3, 4], "seeds": [0], "steps": 600,
                  "samples": 20_000, "ridge_grid": 81},
        "full": {"rank_points": 500, "dim": 4, "scale": 1.5, "neurons": [1, 2, 3, 4, 8], "seeds": [0, 1, 2],
                 "steps": 1500, "samples": 200_000, "ridge_grid": 121},
    },
)
