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
import functools
import multiprocessing
import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from flowprobe.io import read_json
from flowprobe.vae.data import BinaryImages, load_images
from flowprobe.vae.distributed import Distributed
from flowprobe.vae.model import PRESETS
from flowprobe.vae.training import VAEConfig, train_vae

__all__ = ["LABELS", "PUBLISHED", "acceptance", "images_of", "run_table", "summarise", "table_markdown"]

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


@functools.cache
def images_of(source: str) -> BinaryImages:
    """:func:`~flowprobe.vae.data.load_images`, read once per process and source."""
    return load_images(source)


def _train_one(source: str, config: VAEConfig, run: Path, resume: bool, device: str) -> None:
    """One run of the table in a worker process (one thread: the workers share the cores)."""
    torch.set_num_threads(1)
    train_vae(images_of(source), config, out=run, resume=resume, job=Distributed(device=torch.device(device)),
              meta={"data": source})


def _check_recorded(run: Path, config: VAEConfig) -> None:
    recorded = read_json(run / "config.json").get("vae")
    if recorded != dataclasses.asdict(config):
        mine = dataclasses.asdict(config)
        key = next((k for k in mine if not isinstance(recorded, dict) or recorded.get(k) != mine[k]), "vae")
        raise ValueError(f"{run} holds a run with other settings ({key}: "
                         f"{recorded.get(key) if isinstance(recorded, dict) else recorded!r} there, {mine.get(key)!r} "
                         "now); choose another --out")


def run_table(
    source: str,
    config: VAEConfig,
    out: str | Path,
    posteriors: Sequence[str] = PRESETS,
    seeds: Sequence[int] = (0, 1, 2),
    job: Distributed | None = None,
    workers: int = 1,
    callback: Callable[[str, int, dict[str, Any]], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Train every posterior with every seed (``config`` otherwise), each in its own run directory;
    finished runs are read (after checking they used these settings), interrupted ones resumed.

    Args:
        source: The data (``digits`` or a directory of MNIST files, see
            :func:`~flowprobe.vae.data.load_images`).
        config: Settings shared by every run (its ``flow`` and ``seed`` are replaced).
        out: Directory of the runs.
        posteriors: Preset names (:data:`~flowprobe.vae.model.PRESETS`).
        seeds: Seeds of each posterior's runs.
        job: The data-parallel job (each run uses every rank).
        workers: Runs trained at once in worker processes of one thread each, on ``job``'s device
            (one process only). They are started in the order of ``posteriors``: put the slowest first.
        callback: Called with ``(posterior, seed, epoch record)`` (rank 0; runs in this process only).

    Returns:
        ``{posterior: [results.json of each seed]}`` (rank 0's; the other ranks' lists are empty).
    """
    job = job or Distributed()
    unknown = [p for p in posteriors if p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown posterior {unknown[0]!r}; expected some of: {', '.join(PRESETS)}")
    if workers > 1 and job.world > 1:
        raise ValueError("several workers and several ranks exclude each other: give one of them")
    runs = [(p, s, _run_dir(Path(out), p, s), dataclasses.replace(config, flow=p, seed=s))
            for p in posteriors for s in seeds]
    todo = []
    for posterior, seed, run, settings in runs:
        state = {}
        if job.writes:
            state = {"done": (run / "results.json").is_file(), "resume": (run / "checkpoint.json").is_file()}
            if state["resume"] or state["done"]:
                _check_recorded(run, settings)
        state, _ = job.share(state, {})
        if not state["done"]:
            todo.append((posterior, seed, run, settings, state["resume"]))
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_train_one, source, settings, run, resume, str(job.device))
                       for _, _, run, settings, resume in todo]
            for future in futures:
                future.result()
    else:
        for posterior, seed, run, settings, resume in todo:
            progress = None if callback is None else lambda record, p=posterior, s=seed: callback(p, s, record)
            train_vae(images_of(source), settings, out=run, resume=resume, job=job, callback=progress,
                      meta={"data": source})
    results: dict[str, list[dict[str, Any]]] = {p: [] for p in posteriors}
    if job.writes:
        for posterior, seed, run, _ in runs:
            results[posterior].append(read_json(run / "results.json") | {"seed": seed})
    return results


def summarise(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per posterior (in the order of :data:`~flowprobe.vae.model.PRESETS`): mean and standard
    deviation over seeds of ``−ELBO`` and ``NLL``, the seeds, and the training time (seconds, summed over
    seeds)."""
    rows = []
    for posterior, runs in sorted(results.items(), key=lambda item: PRESETS.index(item[0])):
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
