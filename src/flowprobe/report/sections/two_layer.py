"""Section 2: the blog's two-layer split-and-scale example (``docs/theory/approx1d.md`` §1, figure F1).

``N(0, 1)`` through two 1-D ReLU planar layers, ``(w, b, u) = (1, 1, −0.2)`` (breakpoint −1, slope
0.8) then ``(1, −1, 0.875)`` (breakpoint 1, slope 1.875). Measured independently of the collapsed
map's bookkeeping: the mass of each piece by quadrature of the flow's own density (through its
inverses), and the jump of the log-density at each breakpoint, which must be ``−log s``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import special

from flowprobe.plots import figure_png
from flowprobe.report.core import Check, Context, Section, SectionOutput, check
from flowprobe.theory.approx1d import PiecewiseLinearMap, plot_pieces, two_layer_example
from flowprobe.theory.quadrature import integrate_intervals
from flowprobe.validation import validation

__all__ = ["SECTION", "run"]

PIECES = ((-math.inf, -1.0, 0.0, 1.0), (-1.0, 1.0, -0.2, 0.8), (1.0, math.inf, -1.25, 1.5))
"""``(lo, hi, mean, std)`` of the output pieces, from the blog's vector figure."""
SLOPES = {-1.0: 0.8, 1.0: 1.875}
STEP = 1e-9  # offset from a breakpoint at which the one-sided log-densities are read


def run(ctx: Context) -> SectionOutput:
    flow = two_layer_example()
    pwl = PiecewiseLinearMap.from_flow(flow)

    def density(x: np.ndarray) -> np.ndarray:
        with torch.no_grad(), validation(False):
            return flow.log_prob(torch.as_tensor(x, dtype=torch.float64).reshape(-1, 1)).exp().numpy()

    lo, hi = np.array([p[0] for p in PIECES]), np.array([p[1] for p in PIECES])
    masses = integrate_intervals(density, lo, hi, tol=1e-13)
    with torch.no_grad(), validation(False):  # the preimages of the breakpoints, through the flow's inverse
        z, _ = flow.inverse(torch.tensor([[-1.0], [1.0]], dtype=torch.float64))
    cdf = np.concatenate([[0.0], special.ndtr(z.flatten().numpy()), [1.0]])
    expected_mass = np.diff(cdf)
    pieces = [{"piece": f"[{a:g}, {b:g}]", "mean": float(pwl.means[k]), "std": float(pwl.stds[k]),
               "expected_mean": m, "expected_std": s, "mass": float(masses[k]), "source_mass": float(expected_mass[k])}
              for k, (a, b, m, s) in enumerate(PIECES)]
    jumps = []
    for c, s in SLOPES.items():
        with torch.no_grad(), validation(False):
            left, right = flow.log_prob(torch.tensor([[c - STEP], [c + STEP]], dtype=torch.float64)).tolist()
        jumps.append({"breakpoint": c, "slope": s, "log_density_jump": right - left, "minus_log_slope": -math.log(s)})
    parameter_error = max(max(abs(p["mean"] - p["expected_mean"]), abs(p["std"] - p["expected_std"])) for p in pieces)
    mass_error = max(abs(p["mass"] - p["source_mass"]) for p in pieces)
    jump_error = max(abs(j["log_density_jump"] - j["minus_log_slope"]) for j in jumps)
    total = float(masses.sum())
    checks: list[Check] = [
        check("max |mean or std − blog's value| over the pieces", parameter_error, "≤", 1e-12),
        check("max |mass of a piece − source mass of its preimage|", mass_error, "≤", 1e-10),
        check("|total mass − 1|", abs(total - 1), "≤", 1e-10),
        check("max |jump of log density at a breakpoint + log s|", jump_error, "≤", 1e-6),
    ]
    measured = ("The two layers of the blog's example pushed N(0, 1) forward. For each of the three output pieces: "
                "the Gaussian it carries (from the composed piecewise-linear map) against the blog's values, and its "
                "mass by adaptive quadrature of the flow's exact density (evaluated through the layers' inverses) "
                "against the N(0, 1) mass of its preimage (the flow's inverse of the breakpoints). At each "
                "breakpoint c: the jump of the log-density, which must be −log s (one side is rescaled by the "
                "slope s, the other untouched).")
    figure = figure_png(plot_pieces(flow, title="Two ReLU planar layers split N(0, 1) into three Gaussian pieces"))
    return SectionOutput(
        measured,
        {"pieces": pieces, "breakpoints": jumps, "total_mass": total, "max_parameter_error": parameter_error,
         "max_mass_error": mass_error, "max_jump_error": jump_error},
        checks,
        {"pieces": (figure, "Each Gaussian piece (solid) continued dashed beyond its piece (the blog's figure F1).")},
        {"std": "std", "log_density_jump": "jump of log p", "minus_log_slope": "−log s"},
    )


SECTION = Section(
    key="two_layer",
    number=2,
    title="The two-layer split-and-scale example",
    claim="A 1-D ReLU planar layer cuts the density at its breakpoint, leaves one side unchanged and rescales the "
          "other, so two layers turn N(0, 1) into three Gaussian pieces whose masses still sum to one.",
    run=run,
)
