"""``flowprobe topology …``: topology-matching diagnostics (Kong & Chaudhuri 2020, results 2 and 3).

* ``rank``: numerical rank of ``{∇L(z_i)}`` next to the flow's neuron count ``M`` and ``span(B)``.
* ``gaussian``: minimum admissible ``M`` for a Gaussian pair; for isotropic pairs the TV/KL floors,
  and with ``--train`` the below/at/above-bound experiment.
* ``relu``: the ReLU pointwise condition (local linear maps, residual, modes); ``--fit`` trains on a
  forbidden pair.
* ``figures``: the "q, p, L" ridge rows (``M = 1``) and the red-point mode figure.

Flows and densities come from ``path/to/file.py:name`` (an object, or a function without arguments
returning one); the file is imported on purpose — it is the user's own code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from flowprobe.cli import CliError, add_parser, check_finite, positive_int
from flowprobe.distributions import StandardNormal
from flowprobe.flow import Flow
from flowprobe.layers import Planar, Sylvester
from flowprobe.rundir import OutputDir
from flowprobe.theory import topology as tp
from flowprobe.theory import topology_experiments as tx
from flowprobe.theory import topology_figures as tf
from flowprobe.userfile import load_user_value
from flowprobe.validation import check_memory

__all__ = ["add_commands", "load_object"]

MAX_DIM = 2048
MAX_GRID = 2001
POINT_BYTES = 64 * 8  # float64 values kept per point and dimension (points, gradients, Jacobian rows), generously


def load_object(spec: str) -> Any:
    """The object ``name`` of ``path/to/file.py:name``, called first if it is a plain function
    (:func:`~flowprobe.userfile.load_user_value`)."""
    return load_user_value(spec)


def _flow(spec: str | None, default: Flow) -> Flow:
    if spec is None:
        return default
    obj = load_object(spec)
    if not isinstance(obj, Flow):
        raise CliError(f"{spec} must be a flowprobe.Flow, got {type(obj).__name__}")
    return obj


def _density(spec: str | None) -> Any:
    if spec is None:
        return None
    obj = load_object(spec)
    if not callable(getattr(obj, "log_prob", None)):
        raise CliError(f"{spec} must have a log_prob method, got {type(obj).__name__}")
    return obj


def _bounded(low: int, high: int, why: str) -> Any:
    def parse(text: str) -> int:
        value = positive_int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must lie in [{low}, {high}] ({why}), got {value}")
        return value

    return parse


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative comma-separated integers, got {text!r}")
    return values


def _matrix(text: str) -> torch.Tensor:
    try:
        return torch.tensor(json.loads(text), dtype=torch.float64)
    except (json.JSONDecodeError, TypeError, ValueError, RuntimeError):
        raise argparse.ArgumentTypeError(f"expected a JSON matrix such as [[1,0],[0,1]], got {text!r}") from None


def _emit(args: argparse.Namespace, result: dict, lines: list[str]) -> None:
    check_finite(result)
    print(json.dumps(result, indent=2) if args.json else "\n".join(lines))


def default_rank_flow(seed: int) -> Flow:
    """Built-in example: tanh Sylvester (2 neurons) + planar (1) on R^8, M = 3 < d (float64)."""
    torch.manual_seed(seed)
    flow = Flow(StandardNormal(8), [Sylvester(8, hidden=2, activation="tanh"), Planar(8, "tanh")]).double()
    with torch.no_grad():
        for layer in flow.layers:
            layer.b.normal_()
    return flow


# -- rank --------------------------------------------------------------------------------------------


def _rank(args: argparse.Namespace) -> int:
    flow = _flow(args.flow, default_rank_flow(args.seed))
    target, source = _density(args.target), _density(args.source)
    torch.manual_seed(args.seed)
    sampler = source if source is not None and hasattr(source, "sample") else flow.base
    check_memory(POINT_BYTES * args.points * flow.dim, f"--points {args.points} in dimension {flow.dim}")
    report = tp.gradient_set(flow, sampler.sample(args.points), target, source)
    pair = "p = f#q (exact pair)" if target is None else f"p = {args.target}"
    verdict = (
        "consistent with exact transport (rank ≤ M)"
        if report.consistent
        else "rank > M: this flow does NOT map q to p exactly"
    )
    values = ", ".join(f"{v:.3g}" for v in report.singular_values)
    lines = [
        f"L(z) = log p(f(z)) − log q(z), {pair}, {report.points} points",
        f"numerical rank of {{∇L(z_i)}}: {report.rank}   (threshold {report.threshold:.2e} = max(N, d)·eps·σ_max)",
        f"singular values: {values}",
        f"neurons M = {report.neurons}, dim span(B_1..B_T) = {report.subspace_dim}",
        f"gradient outside span(B): max {report.outside_residual:.2e} "
        f"(relative {report.relative_outside_residual:.2e})",
        f"verdict: {verdict}",
    ]
    _emit(args, {"pair": pair, **report.to_dict()}, lines)
    return 0


# -- gaussian ----------------------------------------------------------------------------------------


def _gaussian(args: argparse.Namespace) -> int:
    isotropic = args.dim is not None
    if isotropic == (args.cov_q is not None or args.cov_p is not None):
        raise CliError("give either --dim and --scale (isotropic pair) or both --cov-q and --cov-p")
    if isotropic:
        if args.scale is None or args.scale <= 0:
            raise CliError("--scale (σ of p = N(0, σ²I)) must be a positive number")
        eye = torch.eye(args.dim, dtype=torch.float64)
        cov_q, cov_p = eye, args.scale**2 * eye
    else:
        if args.cov_q is None or args.cov_p is None:
            raise CliError("give both --cov-q and --cov-p")
        if args.train:
            raise CliError("--train runs the isotropic experiment: use --dim and --scale")
        cov_q, cov_p = args.cov_q, args.cov_p
    bound = tp.gaussian_neuron_bound(cov_q, cov_p)
    result: dict[str, Any] = {"bound": bound.__dict__}
    lines = [
        f"variance ratios λ of Σ_p v = λ Σ_q v: {', '.join(f'{e:.4g}' for e in bound.variance_ratios)}",
        f"Δ = Σ_q⁻¹ − Σ_p⁻¹ has n₊ = #{{λ > 1}}, n₋ = #{{λ < 1}} (|λ − 1| ≤ {bound.tolerance:.1e}: round-off)",
        f"minimum admissible neurons M = max(n₊, n₋) = max({bound.positive}, {bound.negative}) = {bound.min_neurons}",
        bound.statement,
    ]
    if isotropic:
        floors = [dict(zip(("neurons", "tv_floor", "kl_floor"), (m, *tp.isotropic_floor(args.dim, m, args.scale)),
                           strict=True)) for m in range(args.dim + 1)]
        result["floors"] = floors
        lines += ["", f"q = N(0, I_{args.dim}), p = N(0, {args.scale:g}² I): lower bounds for any flow with M neurons",
                  "(TV(N(0, I_n), N(0, σ²I_n)), n = d − M; attained by scaling span(B) by σ)",
                  f"{'M':>4} {'TV floor':>10} {'KL floor':>10}"]
        lines += [f"{f['neurons']:>4} {f['tv_floor']:>10.5f} {f['kl_floor']:>10.5f}" for f in floors]
    if args.train:
        check_memory(POINT_BYTES * args.samples * args.dim, f"--samples {args.samples} in dimension {args.dim}")
        torch.set_num_threads(1)
        runs = tx.isotropic_split_experiment(args.dim, args.scale, args.neurons, args.seeds, args.steps, args.layers,
                                             args.activation, samples=args.samples)
        result["runs"] = [{**r.__dict__, "tv": r.tv.to_dict(), "above_floor": r.above_floor} for r in runs]
        lines += ["", f"trained Sylvester flows ({args.activation}, reverse KL, {args.steps} Adam steps, "
                  f"{args.samples} MC samples; KL ± 1.96 s.e., TV with its 95% interval)",
                  f"{'M':>4} {'layers':>6} {'seed':>4} {'KL':>18} {'TV':>28} {'TV floor':>9}  vs bound"]
        for r in runs:
            side = "below" if r.neurons < bound.min_neurons else ("at" if r.neurons == bound.min_neurons else "above")
            tv = f"{float(r.tv.estimate):.5f} [{float(r.tv.low):.5f}, {float(r.tv.high):.5f}]"
            lines.append(f"{r.neurons:>4} {r.layers:>6} {r.seed:>4} {r.kl:>9.5f} ± {1.96 * r.kl_stderr:.5f} "
                         f"{tv:>28} {r.tv_floor:>9.5f}  {side}")
    _emit(args, result, lines)
    return 0


# -- relu ----------------------------------------------------------------------------------------------


def _relu(args: argparse.Namespace) -> int:
    if args.fit is not None:
        run = tx.relu_impossibility(args.fit, args.layers, args.seed, args.steps)
        tvs = ", ".join(f"{s}: {float(e.estimate):.4f} [{float(e.low):.4f}, {float(e.high):.4f}]"
                        for s, e in zip(run.steps, run.tv, strict=True))
        lines = [
            f"forbidden pair {args.fit!r}: {tx.FORBIDDEN_PAIRS[args.fit]}",
            f"ReLU Sylvester flow, {run.layers} layers (M = {2 * run.layers}), seed {run.seed}, forward KL",
            f"TV(f#q, p) with its 95% interval after steps {tvs}",
            f"pointwise residual ‖Cᵀ∇log p(f(z)) − ∇log q(z)‖ over 1000 off-kink points: "
            f"median {run.residual_median:.3g}, 90% {run.residual_p90:.3g}",
            f"control, same flow with p := f#q: max residual {run.exact_residual_max:.2e}",
        ]
        _emit(args, {**run.__dict__, "tv": [e.to_dict() for e in run.tv]}, lines)
        return 0
    flow = _flow(args.flow, tx.relu_demo_flow(args.seed))
    check_memory(POINT_BYTES * args.points * flow.dim, f"--points {args.points} in dimension {flow.dim}")
    target = _density(args.target)
    torch.manual_seed(args.seed)
    z = tp.off_kink_points(flow, args.points)
    residual = tp.pointwise_residual(flow, z, target)
    result: dict[str, Any] = {
        "points": args.points,
        "residual_max": float(residual.max()),
        "residual_median": float(residual.median()),
    }
    lines = [
        "pointwise condition Cᵀ∇log p(f(z)) = ∇log q(z), C = exact local linear map (active pattern)",
        f"{args.points} off-kink points of q: residual max {result['residual_max']:.2e}, "
        f"median {result['residual_median']:.2e}",
    ]
    means = getattr(flow.base, "means", None)
    if means is None:
        lines.append("modes: skipped (the source has no mixture means to start the ascent from)")
    else:
        images = tp.mode_images(flow, tp.find_modes(flow.base, means), target)
        result["modes"] = [{**m.__dict__, "is_mode": m.is_mode} for m in images]
        lines += ["modes z* of q (ascent from the mixture means) and their images f(z*):",
                  f"{'z*':>20} {'f(z*)':>20} {'‖∇log p‖':>9} {'max eig ∇²log p':>15} {'log p(f(z*))':>13} "
                  f"{'log q − log|det C|':>18}  mode of p?"]
        for m in images:
            zs = "(" + ", ".join(f"{v:.3f}" for v in m.mode) + ")"
            xs = "(" + ", ".join(f"{v:.3f}" for v in m.image) + ")"
            lines.append(f"{zs:>20} {xs:>20} {m.image_gradient_norm:>9.1e} {m.image_hessian_max_eigenvalue:>15.4g} "
                         f"{m.log_p_image:>13.8f} {m.predicted_log_p_image:>18.8f}  {'yes' if m.is_mode else 'NO'}")
    _emit(args, result, lines)
    return 0


# -- figures -------------------------------------------------------------------------------------------


def _figures(args: argparse.Namespace) -> int:
    from flowprobe.plots import save_figure

    with OutputDir(Path(args.out), "topology figures") as out:
        ridge, modes = out.claim("topology_ridge.png"), out.claim("topology_modes.png")
        paths = [str(save_figure(tf.ridge_figure(args.grid), ridge)),
                 str(save_figure(tf.modes_figure(size=args.grid), modes))]
    _emit(args, {"figures": paths}, [f"figure: {p}" for p in paths])
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``topology rank | gaussian | relu | figures``."""
    parser = add_parser(sub, "topology")
    topo = parser.add_subparsers(dest="topology_command", required=True, metavar="SUBCOMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = topo.add_parser(name, help=help_text)
        p.add_argument("--json", action="store_true", help="print the numbers as JSON")
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        return p

    rank = add("rank", "rank of the gradient set of L versus the neuron count M")
    rank.add_argument("--flow", help="file.py:name of a Flow (default: built-in tanh stack, d = 8, M = 3)")
    rank.add_argument("--target", help="file.py:name of p (default: the flow itself, p = f#q)")
    rank.add_argument("--source", help="file.py:name of q (default: the flow's base)")
    rank.add_argument("--points", type=positive_int, default=200, help="number of points z_i (default 200)")
    rank.set_defaults(func=_rank)

    gauss = add("gaussian", "minimum neuron count for a Gaussian pair; isotropic floors and training")
    gauss.add_argument("--dim", type=_bounded(1, MAX_DIM, "dim × dim matrices are inverted"),
                       help=f"isotropic pair: q = N(0, I_dim) (dim ≤ {MAX_DIM}) ...")
    gauss.add_argument("--scale", type=float, help="... and p = N(0, scale² I)")
    gauss.add_argument("--cov-q", type=_matrix, help="general pair: Σ_q as a JSON matrix")
    gauss.add_argument("--cov-p", type=_matrix, help="general pair: Σ_p as a JSON matrix")
    gauss.add_argument("--train", action="store_true", help="train Sylvester flows below/at/above the bound")
    gauss.add_argument("--neurons", type=_int_list, default=[1, 2, 3, 4, 8], help="M values (default 1,2,3,4,8)")
    gauss.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="seeds (default 0,1,2)")
    gauss.add_argument("--steps", type=positive_int, default=1500, help="Adam steps (default 1500)")
    gauss.add_argument("--layers", type=positive_int, default=1, help="layers per flow (default 1)")
    gauss.add_argument("--activation", default="identity", help="activation (default identity; e.g. softplus)")
    gauss.add_argument("--samples", type=positive_int, default=200_000,
                       help="MC samples for TV (per side) and KL (default 200000)")
    gauss.set_defaults(func=_gaussian)

    relu = add("relu", "ReLU pointwise condition: residual and modes; --fit: a forbidden pair")
    relu.add_argument("--flow", help="file.py:name of a ReLU Flow (default: 3 random layers on a 4-peak mixture)")
    relu.add_argument("--target", help="file.py:name of p (default: the flow itself, p = f#q)")
    relu.add_argument("--points", type=positive_int, default=1000, help="off-kink points (default 1000)")
    relu.add_argument("--fit", choices=sorted(tx.FORBIDDEN_PAIRS), help="train on a forbidden pair instead")
    relu.add_argument("--layers", type=positive_int, default=4, help="layers for --fit (default 4)")
    relu.add_argument("--steps", type=positive_int, default=2000, help="Adam steps for --fit (default 2000)")
    relu.set_defaults(func=_relu)

    figs = add("figures", "write the ridge (M = 1) and red-point (ReLU modes) figures")
    figs.add_argument("--out", default="topology-out", help="output directory (default topology-out)")
    figs.add_argument("--grid", type=_bounded(3, MAX_GRID, "contour plots need a grid, memory"), default=161,
                      help=f"grid points per axis, 3 to {MAX_GRID} (default 161)")
    figs.set_defaults(func=_figures)
