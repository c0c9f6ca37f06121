"""Section 5: ReLU Sylvester flows, modes to modes, and pairs no such flow can map (result 3;
``docs/theory/topology.md`` §4–5).

* Exact pairs ``p = f#q`` for random ReLU Sylvester flows on a 4-peak mixture: the pointwise
  residual ``‖Cᵀ∇log p(f(z)) − ∇log q(z)‖`` at off-kink points (round-off), and every mode ``z*`` of
  ``q`` mapped to a mode of ``p`` with ``p(f(z*)) = q(z*)/|det C|``.
* The forbidden pairs of :data:`~flowprobe.theory.topology_experiments.FORBIDDEN_PAIRS`, trained by
  maximum likelihood with warm restarts: the TV after each chunk with its interval, and the pointwise
  residual, next to the same residual for the exact pair (the control).
"""

from __future__ import annotations

import torch

from flowprobe.plots import figure_png
from flowprobe.report.core import Context, Section, SectionOutput, check
from flowprobe.report.figures import tv_steps_figure
from flowprobe.theory import topology as tp
from flowprobe.theory.topology_experiments import FORBIDDEN_PAIRS, relu_demo_flow, relu_impossibility
from flowprobe.theory.topology_figures import modes_figure

__all__ = ["SECTION", "mode_rows", "run"]


def mode_rows(seed: int, points: int) -> tuple[dict, list[dict]]:
    """The residual summary and the mode images of :func:`relu_demo_flow` with ``seed``."""
    flow = relu_demo_flow(seed)
    torch.manual_seed(seed)
    residual = tp.pointwise_residual(flow, tp.off_kink_points(flow, points))
    images = tp.mode_images(flow, tp.find_modes(flow.base, flow.base.means))
    summary = {"seed": seed, "residual_max": float(residual.max()), "modes": len(images),
               "modes_mapped_to_modes": sum(m.is_mode for m in images),
               "max_peak_relation_error": max(abs(m.log_p_image - m.predicted_log_p_image) for m in images)}
    modes = [{"seed": seed, "mode": m.mode, "image": m.image, "gradient_norm_at_image": m.image_gradient_norm,
              "hessian_max_eigenvalue": m.image_hessian_max_eigenvalue, "log_p_image": m.log_p_image,
              "log_q_minus_log_det": m.predicted_log_p_image} for m in images]
    return summary, modes


def run(ctx: Context) -> SectionOutput:
    s = ctx.settings
    exact, modes = [], []
    for seed in s["mode_seeds"]:
        summary, rows = mode_rows(seed, s["points"])
        exact.append(summary)
        modes += rows
    ctx.progress(f"modes of {len(s['mode_seeds'])} random flows checked")
    pairs = []
    for pair in s["pairs"]:
        result = relu_impossibility(pair, s["layers"], ctx.seed, s["steps"], s["checkpoints"], points=s["points"],
                                    samples=s["samples"], train_samples=s["train_samples"])
        pairs.append({"pair": pair, "description": FORBIDDEN_PAIRS[pair], "layers": result.layers,
                      "steps": result.steps, "tv": [float(e.estimate) for e in result.tv],
                      "tv_low": [float(e.low) for e in result.tv], "tv_high": [float(e.high) for e in result.tv],
                      "residual_median": result.residual_median, "residual_p90": result.residual_p90,
                      "control_residual_max": result.exact_residual_max})
        ctx.progress(f"forbidden pair {pair}: TV = {pairs[-1]['tv'][-1]:.4f}, residual median "
                     f"{result.residual_median:.3g}")
    control = max([r["residual_max"] for r in exact] + [p["control_residual_max"] for p in pairs])
    checks = [
        check("exact pairs: max pointwise residual", control, "≤", 1e-8),
        check("exact pairs: modes of q not mapped to modes of p",
              float(sum(r["modes"] - r["modes_mapped_to_modes"] for r in exact)), "≤", 0),
        check("exact pairs: max |log p(f(z*)) − (log q(z*) − log|det C|)|",
              max(r["max_peak_relation_error"] for r in exact), "≤", 1e-9),
        check("forbidden pairs: smallest lower end of the final TV interval", min(p["tv_low"][-1] for p in pairs),
              ">", 0),
        check("forbidden pairs: smallest median residual", min(p["residual_median"] for p in pairs), ">",
              1e3 * control, bound_name="10³ × control"),
        check("forbidden pairs: largest change of TV over training (last − first chunk)",
              max(p["tv"][-1] - p["tv"][0] for p in pairs), "<", 0, decisive=False),
    ]
    measured = ("Exact pairs: random ReLU Sylvester flows (3 layers, M = d = 2 each) on an equal-weight 4-peak "
                f"mixture q, p = f#q; the residual of Cᵀ∇log p(f(z)) = ∇log q(z) at {s['points']} off-kink points "
                "(C = the exact local linear map, gradients by autograd), and the modes of q (Newton ascent) with "
                "their images tested as modes of p (gradient, Hessian, peak height). Forbidden pairs: ReLU Sylvester "
                f"flows with {s['layers']} layers trained by maximum likelihood on {s['train_samples']} draws of p "
                f"in {s['checkpoints']} warm-restarted chunks ({s['steps']} steps in all), TV after each chunk from "
                f"{s['samples']} samples per side with its 95% interval, and the pointwise residual against p.")
    figures = {
        "modes": (figure_png(modes_figure(s["mode_seeds"], s["figure_grid"])),
                  "Modes z* of q (red) and their images f(z*), which are modes of p = f#q (white crosses: modes "
                  "of p found by ascent)."),
        "forbidden": (figure_png(tv_steps_figure([{"label": p["pair"], **p} for p in pairs],
                                                 "Forbidden pairs: TV during training")),
                      "TV with its 95% interval after each training chunk: it stays above 0."),
    }
    return SectionOutput(
        measured,
        {"exact_pairs": exact, "mode_images": modes, "forbidden_pairs": pairs},
        checks,
        figures,
        {"residual_max": "max residual", "modes_mapped_to_modes": "modes → modes",
         "max_peak_relation_error": "max peak-height error", "gradient_norm_at_image": "‖∇log p(f(z*))‖",
         "hessian_max_eigenvalue": "max eig ∇²log p", "log_p_image": "log p(f(z*))",
         "log_q_minus_log_det": "log q(z*) − log|det C|", "tv": "TV", "tv_low": "TV low", "tv_high": "TV high",
         "residual_median": "median residual", "residual_p90": "90% residual",
         "control_residual_max": "control: max residual (p := f#q)"},
    )


SECTION = Section(
    key="relu",
    number=5,
    title="ReLU Sylvester flows: modes to modes, and impossible pairs",
    claim="A ReLU Sylvester flow is piecewise linear, so where it maps q exactly onto p it sends modes to modes "
          "with Cᵀ∇log p(f(z)) = ∇log q(z), and pairs that are not affine images of each other cannot be matched.",
    run=run,
    settings={
        "quick": {"mode_seeds": [0, 1], "points": 500, "pairs": ["product", "mixture"], "layers": 4, "steps": 800,
                  "checkpoints": 4, "samples": 20_000, "train_samples": 20_000, "figure_grid": 101},
        "full": {"mode_seeds": [0, 1, 2], "points": 1000, "pairs": ["product", "mixture"], "layers": 4,
                 "steps": 4000, "checkpoints": 4, "samples": 100_000, "train_samples": 100_000, "figure_grid": 161},
    },
)
