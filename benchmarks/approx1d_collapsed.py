"""Collapsed piecewise-linear evaluator vs. running the layers one by one.

Builds the 300-layer ReLU planar flow for the blog mixture, then evaluates the log-density and the
CDF of N = 10⁶ points both ways in the same run (median of repeats, float64, one thread) and prints
the speed ratio and the largest absolute difference. Writes a bar chart with ``--figure``.

    PYTHONPATH=src python benchmarks/approx1d_collapsed.py --figure bench.png
"""

import argparse
import statistics
import time

import numpy as np
import torch

from flowprobe.theory.approx1d import construct


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=300)
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--figure", help="PNG path for a bar chart")
    args = parser.parse_args()
    torch.set_num_threads(1)
    built = construct("blog-mixture", args.layers)
    x = torch.from_numpy(np.random.default_rng(0).uniform(-4.5, 4.5, args.points)).unsqueeze(1)
    xs = x[:, 0].numpy()

    def layers():
        with torch.no_grad():
            z, logdet_inv = built.flow.inverse(x)
            return (built.flow.base.log_prob(z) + logdet_inv).numpy(), torch.special.ndtr(z[:, 0]).numpy()

    def collapsed():
        return built.map.log_prob(xs), built.map.cdf(xs)

    t_layers, (log_q_layers, cdf_layers) = timed(layers, args.repeats)
    t_collapsed, (log_q_collapsed, cdf_collapsed) = timed(collapsed, args.repeats)
    print(f"n = {args.layers} layers, N = {args.points} points, median of {args.repeats} repeats, float64, 1 thread")
    print(f"layer by layer (log-density + CDF): {t_layers:.3f} s")
    print(f"collapsed      (log-density + CDF): {t_collapsed:.3f} s")
    print(f"speed-up: {t_layers / t_collapsed:.1f}x")
    print(f"max |Δ log-density| = {np.abs(log_q_layers - log_q_collapsed).max():.2e}, "
          f"max |Δ CDF| = {np.abs(cdf_layers - cdf_collapsed).max():.2e}")
    if args.figure:
        import matplotlib.pyplot as plt

        from flowprobe.plots import save_figure

        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(["layer by layer", "collapsed"], [t_layers, t_collapsed], color=["tab:grey", "tab:blue"])
        ax.set_ylabel("seconds (median)")
        ax.set_title(f"log-density + CDF of {args.points:.0e} points, n = {args.layers}: "
                     f"{t_layers / t_collapsed:.0f}x")
        save_figure(fig, args.figure)


if __name__ == "__main__":
    main()
