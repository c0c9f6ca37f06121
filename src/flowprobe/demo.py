"""``flowprobe demo``: the main job, a short but real training run on built-in targets.

1. Reverse KL: planar K = 16 fitted to Rezende & Mohamed's U1; reports KL(q‖p) with log Z by
   grid quadrature and the ESS of importance weights.
2. Maximum likelihood: planar K = 16 fitted to the moons data through the exact inverse; reports
   the held-out NLL next to the best single Gaussian and a Gaussian KDE on the same split.

For both trained flows it checks the exact likelihood two ways (forward log-det of samples vs.
``log_prob`` through the inverses) and that the density integrates to one on a grid, writes
density / sample / stage / training-curve figures into ``out/<target>/`` and a JSON summary
``out/demo.json``.
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path
from typing import Any

import torch

from flowprobe.cli import add_parser
from flowprobe.experiments import Target, train_and_score, write_figures
from flowprobe.flow import Flow
from flowprobe.io import write_json
from flowprobe.rundir import OutputDir, RunWriter
from flowprobe.train import FitConfig
from flowprobe.validation import validation

__all__ = ["add_commands", "exactness_checks", "run_demo"]

JOBS = (  # (directory, flow spec, target kind, target name, settings); ~1 min of training on 2 cores
    ("u1", "planar:32:tanh", "energy", "U1", {"steps": 6000}),
    ("moons", "planar:32:tanh", "data", "moons", {"steps": 3000, "batch_size": 256}),  # MLE pays per point
)


@torch.no_grad()
def exactness_checks(flow: Flow, bound: float = 8.0, points: int = 401) -> dict[str, Any]:
    """In float64: ``log q`` of 5 samples from the forward log-det and through the inverses, and the
    mass of ``q`` on ``[−bound, bound]²`` (midpoint rule, ``points²`` cells)."""
    flow = copy.deepcopy(flow).double()
    with validation(False):
        x, log_forward = flow.rsample_and_log_prob(5)
        log_inverse = flow.log_prob(x)
        h = 2 * bound / points
        axis = -bound + h * (torch.arange(points, dtype=torch.float64) + 0.5)
        gx, gy = torch.meshgrid(axis, axis, indexing="ij")
        grid = torch.stack([gx.flatten(), gy.flatten()], -1)
        mass = sum(float(flow.log_prob(chunk).exp().sum()) for chunk in grid.split(65_536)) * h * h
    return {
        "log_prob_forward": log_forward.tolist(),
        "log_prob_inverse": log_inverse.tolist(),
        "max_abs_difference": float((log_forward - log_inverse).abs().max()),
        "density_mass_on_grid": mass,
    }


def run_demo(out: Path, seed: int = 0) -> dict[str, Any]:
    """Train both jobs, write figures into ``out/u1`` and ``out/moons`` and ``out/demo.json``.

    A demo run replaces an earlier demo's runs (only once each new one has its first checkpoint);
    files flowprobe did not write are never replaced.
    """
    results: dict[str, Any] = {}
    with OutputDir(out, "demo") as top:
        path = top.claim("demo.json")
        for directory, spec, kind, name, settings in JOBS:
            target = Target.load(kind, name, n=4000 if kind == "data" else None, seed=seed)
            config = FitConfig(seed=seed, log_every=50, **settings)
            with RunWriter(out / directory, "overwrite") as run:
                flow, history, metrics = train_and_score(spec, target, config, out=run)
                figures = write_figures(flow, target, history.records, run)
            results[directory] = {"flow": spec, "target": name, "steps": history.steps_done,
                                  "seconds": history.seconds, "metrics": metrics,
                                  "exactness": exactness_checks(flow), "figures": figures}
        write_json(path, results)
    return results


def _print(results: dict[str, Any]) -> bool:
    ok = True
    for job in results.values():
        m, e = job["metrics"], job["exactness"]
        print(f"== {job['flow']} on {job['target']}: {job['steps']} steps in {job['seconds']:.1f} s")
        if "kl" in m:
            print(f"   KL(q‖p) = {m['kl']:.4f} ± {m['kl_stderr']:.4f} nats (log Z = {m['log_z']:.6f} by quadrature), "
                  f"ESS = {m['ess_fraction']:.3f}")
        else:
            print(f"   held-out NLL ({m['held_out']}, nats/dim): flow {m['nll_flow']:.4f}, "
                  f"Gaussian {m['nll_gaussian']:.4f}, KDE {m['nll_kde']:.4f}")
        print(f"   log q forward vs. inverse: max |difference| = {e['max_abs_difference']:.2e}; "
              f"density integrates to {e['density_mass_on_grid']:.6f} on [-8, 8]^2 (expect 1)")
        print(f"   figures: {', '.join(job['figures'])}")
        ok &= e["max_abs_difference"] < 1e-8 and math.isclose(e["density_mass_on_grid"], 1.0, abs_tol=1e-2)
    return ok


def _command(args: argparse.Namespace) -> int:
    return 0 if _print(run_demo(Path(args.out), args.seed)) else 1


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``demo``."""
    p = add_parser(sub, "demo")
    p.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=_command)
