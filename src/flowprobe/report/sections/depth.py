"""Section 6: minimum depth against the dimension (result 4; ``docs/theory/depth.md``).

``T_ε`` is the fewest layers with which some flow of a family comes within TV ``ε`` of ``p`` from
``q``. For each dimension ``d`` the section brackets it, ``lower ≤ T_ε ≤ upper``:

* **lower** is proven (:mod:`flowprobe.theory.depth`): Householder flows on ``q = N(0, Λ)``,
  ``p = N(0, Λ′)`` with swapped halves need ``d/2`` reflections; planar flows with ``‖û‖ < U`` from
  ``N(0, I)`` to ``N(R e₁, I)``, ``R = d^κ``, need ``⌈(R − 2Φ⁻¹((1 + ε)/2))/Δ⌉`` layers;
* **upper** is measured: the smallest depth at which a trained flow's TV interval lies at or below
  ``ε`` (:func:`~flowprobe.theory.depth_experiments.measure_depth`, the seeds trained as one ensemble).

A depth below the proven bound that reaches ``ε`` would contradict the theorem (decisive); a bracket
left open only means training did not get there (evidence). The capability comes with
:mod:`flowprobe.theory.depth_experiments`; without it the section is "not available".
"""

from __future__ import annotations

from typing import Any

from flowprobe.plots import figure_png
from flowprobe.report.core import Check, Context, Section, SectionOutput, check

__all__ = ["SECTION", "run"]


def _configurations(s: dict[str, Any]) -> list[dict[str, Any]]:
    """``(series, family, source, target, d, depths)`` of every configuration of the settings."""
    from flowprobe.theory.depth_experiments import theory_of
    from flowprobe.theory.depth_pairs import DTYPES, load_pair

    configs = [{"series": "householder", "family": "householder", "source": "halves:2:1", "target": "halves:1:2",
                "d": d, "depths": list(range(max(d // 2 - 1, 0), d // 2 + 1))} for d in s["householder_dims"]]
    family = f"planar:tanh:umax={float(s['u_max'])!r}"
    for kappa in s["kappas"]:
        for d in s["planar_dims"]:
            target = f"shift:{float(d ** kappa)!r}"
            theory = theory_of(family, load_pair("normal", target, d, DTYPES[s["dtype"]]))
            assert theory is not None  # bounded planar between Gaussians of one covariance
            lower = theory.lower_bound(s["eps"])
            configs.append({"series": f"planar κ={float(kappa):g}", "family": family, "source": "normal",
                            "target": target, "d": d,
                            "depths": list(range(max(lower - 1, 0), lower + s["planar_above"] + 1))})
    return configs


def _rows(ctx: Context) -> list[dict[str, Any]]:
    """One store-like row (``params``, ``status``, ``error``, ``result``) per configuration and depth."""
    from flowprobe.theory.depth_experiments import Training, measure_depth
    from flowprobe.theory.depth_pairs import DTYPES, load_pair

    s = ctx.settings
    training = Training(steps=s["steps"], lr=s["lr"], batch_size=s["batch_size"], train_samples=s["train_samples"],
                        tv_samples=s["tv_samples"], level=s["level"], dtype=s["dtype"])
    rows = []
    for config in _configurations(dict(s)):
        pair = load_pair(config["source"], config["target"], config["d"], DTYPES[s["dtype"]])
        for depth in config["depths"]:
            params = {"series": config["series"], "family": config["family"], "source": config["source"],
                      "target": config["target"], "d": config["d"], "depth": depth, "eps": s["eps"],
                      "seeds": list(s["seeds"]), **training.params()}
            result = measure_depth(config["family"], pair, depth, s["seeds"], s["eps"], training, ctx.seed)
            rows.append({"key": f"{config['series']}/{config['d']}/{depth}", "params": params, "status": "ok",
                         "error": None, "result": result})
        ctx.progress(f"{config['series']} d={config['d']}: depths {config['depths']} measured")
    return rows


def run(ctx: Context) -> SectionOutput:
    from flowprobe.theory.depth_experiments import brackets
    from flowprobe.theory.depth_figures import bracket_figure

    s = ctx.settings
    found = brackets(_rows(ctx))
    table = []
    for c in found:
        best = {r["params"]["depth"]: r["result"]["best_high"] for r in c.rows}
        table.append({"series": str(c.params["series"]), "d": c.params["d"], "proven_lower": c.bracket.lower,
                      "real_bound": c.bound, "measured_upper": c.bracket.upper, "closed": c.bracket.closed,
                      "depths": sorted(best), "best_tv_high": [best[n] for n in sorted(best)]})
    below = [(c, r["result"]) for c in found for r in c.rows
             if c.bracket.lower is not None and r["params"]["depth"] < c.bracket.lower]
    householder = [c for c in found if c.params["series"] == "householder"]
    planar = [c for c in found if c.params["series"] != "householder"]
    floors = [{"series": str(c.params["series"]), "d": c.params["d"], "depth": res["depth"], "floor": res["floor"],
               "best_tv_high": res["best_high"]} for c, res in below]
    checks: list[Check] = [
        check("depths below the proven bound whose TV interval reached ε",
              float(sum(res["status"] == "reached" for _, res in below)), "≤", 0),
        check("depths below the proven bound whose best TV upper end lies under the TV floor",
              float(sum(res["best_high"] is not None and res["best_high"] < res["floor"] for _, res in below)), "≤", 0),
        check("Householder dimensions whose bracket is not closed at d/2",
              float(sum(not c.bracket.closed for c in householder)), "≤", 0, decisive=False),
        check(f"bounded planar: largest measured upper − proven lower (depths up to lower + {s['planar_above']})",
              float(max((c.bracket.upper - c.bracket.lower) if c.bracket.upper is not None else s["planar_above"] + 1
                        for c in planar)), "≤", s["planar_above"], decisive=False),
    ]
    measured = (f"For each d, flows of each depth around the proven bound trained as one ensemble of "
                f"{len(s['seeds'])} seeds ({s['steps']} Adam steps, maximum likelihood on {s['train_samples']} draws "
                f"of p), each seed's TV(f#q, p) estimated from {s['tv_samples']} draws per side with an "
                f"empirical-Bernstein interval at level {s['level']} (Bonferroni over the seeds); a depth reaches "
                f"ε = {s['eps']} when some interval's upper end is ≤ ε. Householder: q = N(0, diag(2,…,2,1,…,1)) → "
                f"p = N(0, diag(1,…,1,2,…,2)), d = {s['householder_dims']}. Bounded planar (tanh, ‖û‖ < {s['u_max']}): "
                f"N(0, I) → N(d^κ e₁, I), κ = {s['kappas']}, d = {s['planar_dims']}.")
    figure = bracket_figure(found)
    return SectionOutput(
        measured,
        {"brackets": table, "below_the_bound": floors},
        checks,
        {"brackets": (figure_png(figure), "Minimum depth against d: the proven lower bound (line; dashed: its real "
                      "value), the measured upper bound (orange), and depths that did not reach ε (crosses).")},
        {"proven_lower": "proven T_ε ≥", "real_bound": "bound (real)", "measured_upper": "measured T_ε ≤",
         "best_tv_high": "best TV upper end", "floor": "TV floor"},
    )


SECTION = Section(
    key="depth",
    number=6,
    title="Minimum depth against the dimension",
    claim="Householder flows and planar flows with bounded parameters need a number of layers that grows with "
          "the dimension d to come within TV ε of some targets.",
    run=run,
    settings={
        "quick": {"householder_dims": [2, 4, 6], "kappas": [0.5], "planar_dims": [2, 8], "u_max": 1.0,
                  "planar_above": 1, "eps": 0.1, "seeds": [0, 1], "steps": 400, "lr": 0.05, "batch_size": 256,
                  "train_samples": 8192, "tv_samples": 20_000, "level": 0.95, "dtype": "float64"},
        "full": {"householder_dims": [2, 4, 6, 8], "kappas": [0.5, 1.0], "planar_dims": [2, 4, 8, 16], "u_max": 1.0,
                 "planar_above": 2, "eps": 0.1, "seeds": [0, 1, 2, 3], "steps": 1000, "lr": 0.05, "batch_size": 256,
                 "train_samples": 8192, "tv_samples": 20_000, "level": 0.95, "dtype": "float64"},
    },
    requires=("flowprobe.theory.depth_experiments",),
    issue="issue 12",
)
