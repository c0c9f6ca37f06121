"""Section 8: VAEs with flow posteriors, in the form of van den Berg et al.'s Table 1 (``docs/vae.md``).

Each posterior (:data:`~flowprobe.vae.model.PRESETS`) is trained with every seed on the same budget
(:func:`~flowprobe.vae.training.train_vae`, no run directory: the report keeps the numbers), and its
best weights are scored on the test images: ``−ELBO`` and the importance-sampled NLL with their
standard errors. The data are the bundled binarised digits, or MNIST when ``flowprobe reproduce
--mnist DIR`` names its files.

The claim is empirical, so the verdict separates noise from contradiction. Posteriors are compared
on the same test images (paired: ``z`` = mean per-image NLL difference over its standard error). Only
runs that converged (stopped by the patience rule, not by the epoch budget) can contradict the claim:
then a flow significantly worse than the plain VAE (``z ≥ 2``) does (decisive), and a flow whose NLL
is not below the VAE's, but not significantly worse, leaves it open (inconclusive). Runs ended by the
epoch budget support it only when every flow is significantly better than the plain VAE at that budget
(``z ≤ −2``). The best Sylvester variant is "at least as good as planar ``K = 16``" when it is not
significantly worse (``z < 2``; decisive between converged runs).
The capability comes with :mod:`flowprobe.vae`; without it the section is "not available".
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from flowprobe.plots import figure_png, plt
from flowprobe.report.core import Check, Context, Section, SectionOutput, check

__all__ = ["SECTION", "run"]

SYLVESTER = ("o-snf", "h-snf", "t-snf")


def _train(ctx: Context) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train every posterior with every seed; return one row per posterior and the per-image NLLs.

    Row: mean over seeds and test images of ``−ELBO`` and NLL, the NLL's spread over seeds and its
    standard error over images. Per image: the NLL averaged over seeds (a tensor ``(N,)`` per posterior),
    recomputed from the trained model with the samples ``train_vae`` scored it with (same numbers).
    """
    import torch

    from flowprobe.vae import VAEConfig, load_images, train_vae
    from flowprobe.vae.evaluation import per_point_estimates
    from flowprobe.vae.table import LABELS
    from flowprobe.vae.training import TEST_SEED

    s = ctx.settings
    images = load_images(s["data"])
    config = VAEConfig(latent=s["latent"], hidden=s["hidden"], epochs=s["epochs"], warmup=s["warmup"],
                       patience=s["patience"], nll_samples=s["nll_samples"])
    rows, per_image = [], {}
    for posterior in s["posteriors"]:
        runs, nll_images = [], []
        for seed in s["seeds"]:
            trained = train_vae(images, config, flow=posterior, seed=ctx.seed + seed)
            with torch.no_grad():
                _, nll = per_point_estimates(trained.model, images.test, config.nll_samples, config.eval_rows,
                                             ctx.seed + seed + TEST_SEED)
            nll_images.append(nll.double())
            runs.append({**trained.metrics.to_json(), **trained.summary})
        per_image[posterior] = torch.stack(nll_images).mean(0)
        nll_runs = [r["nll"] for r in runs]
        rows.append({"posterior": posterior, "label": LABELS.get(posterior, posterior),
                     "neg_elbo": statistics.fmean(r["neg_elbo"] for r in runs), "nll": statistics.fmean(nll_runs),
                     "nll_std": statistics.stdev(nll_runs) if len(nll_runs) > 1 else 0.0,
                     "nll_se": _se(per_image[posterior]), "epochs": [r["epochs_done"] for r in runs],
                     "stopped_early": [r["stopped_early"] for r in runs],
                     "seconds": sum(r["seconds"] for r in runs)})
        ctx.progress(f"{posterior}: NLL = {rows[-1]['nll']:.3f} ± {rows[-1]['nll_se']:.3f} "
                     f"({rows[-1]['seconds']:.0f} s)")
    return rows, per_image


def _se(values: Any) -> float:
    """Standard error of the mean of a tensor ``(N,)``."""
    return float(values.std() / math.sqrt(values.numel()))


def _comparisons(rows: list[dict[str, Any]], per_image: dict[str, Any]) -> list[dict[str, Any]]:
    """Paired differences on the same test images: every flow against the plain VAE, and the best
    Sylvester variant against planar ``K = 16``."""
    pairs = [(r["posterior"], "vae") for r in rows if r["posterior"] != "vae"]
    sylvester = [r for r in rows if r["posterior"] in SYLVESTER]
    if sylvester and "planar16" in per_image:
        pairs.append((min(sylvester, key=lambda r: r["nll"])["posterior"], "planar16"))
    out = []
    for a, b in pairs:
        diff = per_image[a] - per_image[b]
        mean, se = float(diff.mean()), _se(diff)
        out.append({"posterior": a, "against": b, "nll_difference": mean, "se": se, "z": mean / se})
    return out


def _checks(rows: list[dict[str, Any]], comparisons: list[dict[str, Any]], z: float) -> list[Check]:
    """The claim's checks (module docstring). Between converged runs (stopped early by the patience rule)
    a flow significantly worse than the plain VAE, or the best Sylvester variant significantly worse than
    planar ``K = 16``, contradicts the claim. When the epoch budget ended training first nothing can
    contradict it, and only evidence that stands out of the noise supports it: every flow significantly
    better than the plain VAE at the same budget (``z ≤ −z*``). "At least as good as planar" is "not
    significantly worse" either way (a point estimate of a tie falls on either side by chance)."""
    converged = all(all(r["stopped_early"]) for r in rows)
    largest = max(c["z"] for c in comparisons if c["against"] == "vae")
    if converged:
        checks = [
            check("largest z of NLL(flow) − NLL(no flow)", largest, "<", z),
            check("flows whose NLL is not below the plain VAE's",
                  float(sum(c["nll_difference"] >= 0 for c in comparisons if c["against"] == "vae")), "≤", 0,
                  decisive=False),
        ]
    else:
        checks = [check("largest z of NLL(flow) − NLL(no flow), runs ended by the epoch budget", largest, "≤", -z,
                        decisive=False)]
    checks += [check(f"z of NLL({c['posterior']}) − NLL(planar16)", c["z"], "<", z, decisive=converged)
               for c in comparisons if c["against"] == "planar16"]
    return checks


def _figure(rows: list[dict[str, Any]]) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(rows) + 1.2))
    y = range(len(rows))
    ax.errorbar([r["nll"] for r in rows], list(y), xerr=[2 * r["nll_se"] for r in rows], fmt="o", capsize=3)
    ax.set_yticks(list(y), [r["label"] for r in rows])
    ax.invert_yaxis()
    ax.axvline(rows[0]["nll"], color="0.6", ls="--", lw=1)
    ax.set_xlabel("test NLL (nats per image; lower is better), ± 2 SE")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)


def run(ctx: Context) -> SectionOutput:
    s = ctx.settings
    if "vae" not in s["posteriors"]:
        raise ValueError("the posteriors must include 'vae' (the baseline)")
    rows, per_image = _train(ctx)
    comparisons = _comparisons(rows, per_image)
    measured = (f"On {s['data']}: a VAE (MLP encoder/decoder, {s['hidden']} hidden units, latent d = {s['latent']}, "
                f"Bernoulli likelihood) with each posterior, trained with seeds {list(s['seeds'])} for at most "
                f"{s['epochs']} epochs (KL warm-up {s['warmup']}, Adamax, best validation weights); test −ELBO and "
                f"importance-sampled NLL with S = {s['nll_samples']} samples per image (averaged over seeds). Two "
                f"posteriors are compared on the same test images: z = mean per-image NLL difference / its standard "
                f"error; a flow is significantly worse than another when z ≥ {s['z']}.")
    return SectionOutput(
        measured,
        {"table": rows, "comparisons": comparisons},
        _checks(rows, comparisons, s["z"]),
        {"nll": (_figure(rows), "Test NLL per posterior with ± 2 SE; dashed: the plain VAE.")},
        {"neg_elbo": "−ELBO", "nll": "NLL", "nll_std": "NLL std (seeds)", "nll_se": "NLL SE",
         "nll_difference": "NLL difference", "se": "SE"},
    )


SECTION = Section(
    key="vae",
    number=8,
    title="VAEs with flow posteriors (van den Berg et al.'s Table 1)",
    claim="Flow posteriors improve a VAE's likelihood, and Sylvester flows do at least as well as planar flows.",
    run=run,
    settings={
        "quick": {"data": "digits", "posteriors": ["vae", "planar16", "o-snf"], "seeds": [0],
                  "latent": 8, "hidden": 128, "epochs": 40, "warmup": 10, "patience": 10, "nll_samples": 500,
                  "z": 2.0},
        "full": {"data": "digits", "posteriors": ["vae", "planar16", "planar80", "radial", "householder", "o-snf",
                                                  "h-snf", "t-snf"], "seeds": [0, 1, 2],
                 "latent": 8, "hidden": 128, "epochs": 200, "warmup": 50, "patience": 50, "nll_samples": 5000,
                 "z": 2.0},
    },
    requires=("flowprobe.vae",),
    issue="issue 13",
)
