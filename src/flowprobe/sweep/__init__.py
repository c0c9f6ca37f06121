"""Sweeps at scale: grids of independent runs, executed locally or on Ray, recorded in a SQLite store.

A sweep is a named grid of runs of one top-level function ``fn(params) -> dict`` (named
``"package.module:function"`` so that worker processes and Ray nodes can import it). Each run is
identified by the canonical JSON of its parameters and gets a seed derived from that key, so every
executor gives the same numbers. ``run_sweep`` runs whatever the store lacks and commits one row per
run as it ends; ``Store`` reads the rows back (also while a sweep writes)::

    from flowprobe.sweep import Store, Sweep, format_table, run_sweep

    sweep = Sweep("depth", "myexp.runs:train_one", {"d": [2, 4], "depth": [1, 2, 3], "seed": [0, 1]})
    run_sweep(sweep, "depth.sqlite", workers=2)            # or ray_address="auto"
    with Store("depth.sqlite", readonly=True) as store:
        print(format_table(*store.table()))

See ``docs/sweep.md`` for the store's schema and the guarantees under interruption and concurrency.
"""

from flowprobe.sweep.grid import MAX_RUNS, SEED_PARAM, Run, Sweep, canonical_key, derive_seed
from flowprobe.sweep.progress import Progress
from flowprobe.sweep.runner import SweepSummary, run_sweep
from flowprobe.sweep.store import COLUMNS, Store, format_table

__all__ = [
    "COLUMNS",
    "MAX_RUNS",
    "SEED_PARAM",
    "Progress",
    "Run",
    "Store",
    "Sweep",
    "SweepSummary",
    "canonical_key",
    "derive_seed",
    "format_table",
    "run_sweep",
]
