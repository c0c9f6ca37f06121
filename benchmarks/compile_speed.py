"""Eager against ``torch.compile`` (inductor) on the same work, timed side by side in one run.

Rows (float32; see the README's "Performance" section):

* ``rkl-planar``, ``rkl-radial``: a reverse-KL training step on U1 (Rezende & Mohamed 2015),
  K = 32, d = 2, batch 256, Adam: ``rsample_and_log_prob`` + energy + mean compiled, the backward
  (AOTAutograd's compiled backward) and ``opt.step`` run as usual;
* ``rkl-sylvester``, ``logp-sylvester``: the same step, and ``log_prob`` without gradient, for
  orthogonal Sylvester layers (K = 32, d = 2, batch 256; its inverse solves scalar equations with
  the eager safeguarded solver between compiled graphs);
* ``ml-planar``, ``ml-radial``: a maximum-likelihood step (``log_prob`` through the inverses, with
  gradient) on a fixed batch of 256 of the flow's own samples, K = 32, d = 2, Adam;
* ``logp-planar-256``, ``logp-planar-4096``: ``log_prob`` through the inverses without gradient,
  planar-tanh K = 32, d = 2;
* ``sample-planar``, ``sample-radial``: ``rsample_and_log_prob`` without gradient, K = 16, d = 64,
  batch 4096.

Eager and compiled calls alternate inside each repetition; each time is the median of ``--reps``
repetitions after a warm-up. ``compile s`` is the first compiled call (Dynamo + inductor + the C++
compiler; the FX graph cache is off so that every run compiles afresh). Compiled code draws random
numbers through torch's generator (``fallback_random``), so both variants see the same samples and
``max |Δ|`` (largest difference of outputs, and of gradients for training steps, relative to the
largest eager value) compares the very same computation. For ``ml`` and ``log_prob`` rows,
``eager err`` and ``comp. err`` are the same measure against eager float64: float32 rounding
through the inverses, which these weights (``α = wᵀû`` down to −0.93) make ill-conditioned.

Run: ``PYTHONPATH=src python benchmarks/compile_speed.py [--threads 1] [--rows a,b] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch._inductor.config
from inverse_cost import median_time

import flowprobe as fp
from flowprobe.distributions import rezende_energy
from flowprobe.io import write_json

U1 = rezende_energy("U1")
LR = 1e-3


@dataclass
class Row:
    key: str
    description: str
    family: str
    k: int
    d: int
    batch: int
    kind: str  # "rkl", "ml", "log_prob" or "sample"


ROWS = [
    Row("rkl-planar", "reverse-KL step, planar-tanh K=32 d=2 batch 256", "planar", 32, 2, 256, "rkl"),
    Row("rkl-radial", "reverse-KL step, radial K=32 d=2 batch 256", "radial", 32, 2, 256, "rkl"),
    Row("ml-planar", "max-likelihood step, planar-tanh K=32 d=2 batch 256", "planar", 32, 2, 256, "ml"),
    Row("ml-radial", "max-likelihood step, radial K=32 d=2 batch 256", "radial", 32, 2, 256, "ml"),
    Row("rkl-sylvester", "reverse-KL step, sylvester-O K=32 d=2 batch 256", "sylvester", 32, 2, 256, "rkl"),
    Row("logp-sylvester", "log_prob (no grad), sylvester-O K=32 d=2 batch 256", "sylvester", 32, 2, 256, "log_prob"),
    Row("logp-planar-256", "log_prob (no grad), planar-tanh K=32 d=2 batch 256", "planar", 32, 2, 256, "log_prob"),
    Row("logp-planar-4096", "log_prob (no grad), planar-tanh K=32 d=2 batch 4096", "planar", 32, 2, 4096, "log_prob"),
    Row("sample-planar", "sample + log-density, planar-tanh K=16 d=64 batch 4096", "planar", 16, 64, 4096, "sample"),
    Row("sample-radial", "sample + log-density, radial K=16 d=64 batch 4096", "radial", 16, 64, 4096, "sample"),
]


def build(row: Row) -> fp.Flow:
    torch.manual_seed(0)
    stack = {
        "planar": lambda: fp.Planar(row.d, "tanh", layers=row.k),
        "radial": lambda: fp.Radial(row.d, layers=row.k),
        "sylvester": lambda: fp.Sylvester(row.d, kind="orthogonal", layers=row.k),
    }[row.family]
    flow = fp.Flow(fp.StandardNormal(row.d), [stack()])
    with torch.no_grad():  # away from the near-identity initialisation (as benchmarks/inverse_cost.py)
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return flow


def largest_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1.0)) for x, y in zip(a, b, strict=True))


def prepare(
    row: Row, compiled: bool, dtype: torch.dtype = torch.float32
) -> tuple[Callable[[], None], Callable[[], list[torch.Tensor]]]:
    """The timed call, and a call returning the outputs (and gradients) compared between variants."""
    flow = build(row)
    if row.kind == "rkl":

        def loss_fn() -> torch.Tensor:
            x, log_q = flow.rsample_and_log_prob(row.batch)
            return (log_q + U1.energy(x)).mean()

        loss = torch.compile(loss_fn) if compiled else loss_fn
        opt = torch.optim.Adam(flow.parameters(), lr=LR)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt.step()

        def outputs() -> list[torch.Tensor]:  # loss and gradients, no optimiser step
            torch.manual_seed(1)
            flow.zero_grad(set_to_none=True)
            value = loss()
            value.backward()
            return [value.detach(), *(p.grad.clone() for p in flow.parameters())]

        return step, outputs
    if row.kind in ("ml", "log_prob"):
        with torch.no_grad():
            x = flow.sample(row.batch).to(dtype)  # the same points in every dtype
        flow = flow.to(dtype)
        log_prob = torch.compile(flow.log_prob) if compiled else flow.log_prob
    if row.kind == "ml":
        opt = torch.optim.Adam(flow.parameters(), lr=LR)

        def ml_step() -> None:
            opt.zero_grad(set_to_none=True)
            (-log_prob(x).mean()).backward()
            opt.step()

        def ml_outputs() -> list[torch.Tensor]:
            flow.zero_grad(set_to_none=True)
            value = -log_prob(x).mean()
            value.backward()
            return [value.detach(), *(p.grad.clone() for p in flow.parameters())]

        return ml_step, ml_outputs
    if row.kind == "log_prob":

        def call() -> list[torch.Tensor]:
            with torch.no_grad():
                return [log_prob(x)]

        return call, call
    sample = torch.compile(flow.rsample_and_log_prob) if compiled else flow.rsample_and_log_prob

    def draw() -> list[torch.Tensor]:
        with torch.no_grad():
            return list(sample(row.batch))

    def seeded() -> list[torch.Tensor]:
        torch.manual_seed(1)
        return draw()

    return draw, seeded


def time_row(row: Row, reps: int, target_s: float) -> dict[str, float]:
    eager, eager_outputs = prepare(row, compiled=False)
    compiled, compiled_outputs = prepare(row, compiled=True)
    expected = eager_outputs()
    start = time.perf_counter()
    got = compiled_outputs()  # the first compiled call: compiles
    compile_s = time.perf_counter() - start
    difference = largest_difference(got, expected)
    errors = {"eager_error": float("nan"), "compiled_error": float("nan")}
    if row.kind in ("ml", "log_prob"):  # float32 rounding through the inverses: both against float64
        reference = prepare(row, compiled=False, dtype=torch.float64)[1]()
        errors["eager_error"] = largest_difference(expected, reference)
        errors["compiled_error"] = largest_difference(got, reference)
    times = median_time({"eager": eager, "compiled": compiled}, reps, target_s)
    return {
        "eager_ms": 1e3 * times["eager"],
        "compiled_ms": 1e3 * times["compiled"],
        "speedup": times["eager"] / times["compiled"],
        "compile_s": compile_s,
        "max_rel_difference": difference,
        **errors,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, choices=(1, 2), default=1)
    parser.add_argument("--rows", default=",".join(r.key for r in ROWS), help="comma-separated row keys")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.25, help="seconds per repetition and variant")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    known = {r.key: r for r in ROWS}
    unknown = [k for k in args.rows.split(",") if k not in known]
    if unknown:
        parser.error(f"unknown rows {unknown}; expected some of {sorted(known)}")
    if args.reps < 5:
        parser.error("--reps must be at least 5")
    torch.set_num_threads(args.threads)
    torch._inductor.config.fx_graph_cache = False
    torch._inductor.config.fallback_random = True
    results = {}
    print(f"torch {torch.__version__}, {args.threads} thread(s), medians of {args.reps}")
    print(f"{'row':<58} {'eager ms':>9} {'compiled ms':>12} {'speedup':>8} {'compile s':>10} {'max |Δ|':>9} "
          f"{'eager err':>9} {'comp. err':>9}")
    for key in args.rows.split(","):
        row = known[key]
        torch._dynamo.reset()
        r = results[key] = {"description": row.description, **time_row(row, args.reps, args.target)}
        print(f"{row.description:<58} {r['eager_ms']:>9.3f} {r['compiled_ms']:>12.3f} {r['speedup']:>7.2f}x "
              f"{r['compile_s']:>10.1f} {r['max_rel_difference']:>9.1e} {r['eager_error']:>9.1e} "
              f"{r['compiled_error']:>9.1e}", flush=True)
    report = {
        "torch": torch.__version__,
        "threads": args.threads,
        "reps": args.reps,
        "machine": platform.machine(),
        "rows": results,
    }
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
