"""Van den Berg et al.'s Table 1 for our runs: ``−ELBO`` and importance-sampled NLL, mean ± std over
seeds, for the plain VAE and every flow posterior, all with the same budget.

:func:`run_table` trains (or resumes, or reads) one run directory per posterior and seed,
``OUT/<posterior>/seed-<s>``, so an interrupted table continues where it stopped;
:func:`summarise` and :func:`table_markdown` turn the runs' ``results.json`` into the table. On
MNIST the published numbers are printed beside ours; they are recalled, not checked against the
papers (hence "published (approx.)"), and come from other architectures and budgets.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flowprobe.io import read_json
from flowprobe.vae.data import BinaryImages
from flowprobe.vae.distributed import Distributed
from flowprobe.vae.model import PRESETS
from flowprobe.vae.training import VAEConfig, train_vae

__all__ = ["LABELS", "PUBLISHED", "acceptance", "run_table", "summarise", "table_markdown"]

LABELS = {
    "vae": "No flow",
    "planar16": "Planar (K = 16)",
    "planar80": "Planar (K = 80)",
    "radial": "Radial (K = 16)",
    "householder": "Householder (K = 16)",
    "o-snf": "O-SNF (K = 16, M = d/2)",
    "h-snf": "H-SNF (K = 16, 8 reflections)",
    "t-snf": "T-SNF (K = 16)",
}

PUBLISHED: dict[str, tuple[str, str, str]] = {  # posterior -> (−ELBO, NLL, source) on statically binarised MNIST
    "vae": ("86.55 ± 0.06", "82.14 ± 0.07", "vdB18"),
    "planar16": ("86.06 ± 0.31", "81.91 ± 0.22", "vdB18"),
    "planar80": ("—", "85.1", "R&M15"),
    "o-snf": ("83.32 ± 0.06", "80.22 ± 0.03", "vdB18"),
    "h-snf": ("83.40 ± 0.01", "80.29 ± 0.02", "vdB18"),
    "t-snf": ("83.40 ± 0.10", "80.28 ± 0.06", "vdB18"),
}
SOURCES = {
    "vdB18": "van den Berg et al. (2018), Table 1: gated convolutional encoder/decoder, 64 latent dimensions "
             "(recalled values)",
    "R&M15": "Rezende & Mohamed (2015), Table 2: DLGM with 40 latent dimensions and maxout layers of 400 units "
             "(−ln p(x))",
}


def _run_dir(out: Path, posterior: str, seed: int) -> Path:
    return out / posterior / f"seed-{seed}"


def run_table(
    images: BinaryImages,
    config: VAEConfig,
    out: str | Path,
    posteriors: Sequence[str] = PRESETS,
    seeds: Sequence[int] = (0, 1, 2),
    job: Distributed | None = None,
    callback: Callable[[str, int, dict[str, Any]], None] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Train every posterior with every seed (``config`` otherwise), each in its own run directory;
    finished runs are read, interrupted ones resumed.

    Args:
        images: The data.
        config: Settings shared by every run (its ``flow`` and ``seed`` are replaced).
        out: Directory of the runs.
        posteriors: Preset names (:data:`~flowprobe.vae.model.PRESETS`).
        seeds: Seeds of each posterior's runs.
        job: The data-parallel job (each run uses every rank).
        callback: Called with ``(posterior, seed, epoch record)`` (rank 0).
        meta: Extra facts for each run's ``config.json`` (e.g. the data source).

    Returns:
        ``{posterior: [results.json of each seed]}`` (rank 0's; the other ranks' lists are empty).
    """
    job = job or Distributed()
    unknown = [p for p in posteriors if p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown posterior {unknown[0]!r}; expected some of: {', '.join(PRESETS)}")
    results: dict[str, list[dict[str, Any]]] = {p: [] for p in posteriors}
    for posterior in posteriors:
        for seed in seeds:
            run = _run_dir(Path(out), posterior, seed)
            mode = {}
            if job.writes:
                mode = {"done": (run / "results.json").is_file(), "resume": (run / "checkpoint.json").is_file()}
            mode, _ = job.share(mode, {})
            if not mode["done"]:
                progress = None if callback is None else lambda record, p=posterior, s=seed: callback(p, s, record)
                train_vae(images, dataclasses.replace(config, flow=posterior, seed=seed), out=run,
                          resume=mode["resume"], job=job, callback=progress, meta=meta)
            if job.writes:
                results[posterior].append(read_json(run / "results.json") | {"seed": seed})
    return results


def summarise(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per posterior: mean and standard deviation over seeds of ``−ELBO`` and ``NLL``, the
    seeds, and the training time (seconds, summed over seeds)."""
    rows = []
    for posterior, runs in results.items():
        row: dict[str, Any] = {"posterior": posterior, "label": LABELS.get(posterior, posterior),
                               "seeds": [r["seed"] for r in runs], "seconds": sum(r["seconds"] for r in runs),
                               "epochs": [r["epochs_done"] for r in runs]}
        for key in ("neg_elbo", "nll"):
            values = [r[key] for r in runs]
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def acceptance(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The claims of the table, checked on the means: which flows improve the NLL of the plain VAE,
    and whether the best Sylvester variant is at least as good as planar K = 16."""
    by = {r["posterior"]: r for r in rows}
    out: dict[str, Any] = {}
    if "vae" in by:
        flows = [p for p in by if p != "vae"]
        out["improve_nll_over_vae"] = {p: by[p]["nll"] < by["vae"]["nll"] for p in flows}
    sylvester = [p for p in ("o-snf", "h-snf", "t-snf") if p in by]
    if sylvester and "planar16" in by:
        best = min(sylvester, key=lambda p: by[p]["nll"])
        out["best_sylvester"] = best
        out["best_sylvester_at_least_planar16"] = by[best]["nll"] <= by["planar16"]["nll"]
    return out


def table_markdown(rows: Sequence[dict[str, Any]], published: bool = False) -> str:
    """The table in Markdown: mean ± std over seeds (nats per image; lower is better), optionally with
    the published MNIST numbers beside ours."""
    head = "| Posterior | −ELBO | NLL | seeds | train time (s, all seeds) |"
    rule = "|---|---|---|---|---|"
    if published:
        head += " −ELBO published (approx.) | NLL published (approx.) |"
        rule += "---|---|"
    lines = [head, rule]
    for r in rows:
        line = (f"| {r['label']} | {r['neg_elbo']:.2f} ± {r['neg_elbo_std']:.2f} | {r['nll']:.2f} ± "
                f"{r['nll_std']:.2f} | {len(r['seeds'])} | {r['seconds']:.0f} |")
        if published:
            elbo, nll, source = PUBLISHED.get(r["posterior"], ("—", "—", ""))
            tag = f" [{source}]" if source else ""
            line += f" {elbo} | {nll}{tag} |"
        lines.append(line)
    if published:
        lines += [""] + [f"[{key}] {text}" for key, text in SOURCES.items()]
    return "\n".join(lines)
