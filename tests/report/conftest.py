"""A report of the real sections with tiny settings, made once per test session (tests/report/*)."""

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report_fakes, page_check, browser

from flowprobe.report.runner import reproduce  # noqa: E402
from flowprobe.report.sections import SECTIONS  # noqa: E402

TINY = {
    "stages": {"flow": "planar:2:tanh", "energy": "U1", "steps": 10, "stages": [0, 1, 2], "samples": 2000,
               "mass_bound": 8.0, "mass_points": 201, "mass_tolerance": 1e-2, "figure_points": 12},
    "two_layer": {},
    "approx1d": {"target": "blog-mixture", "depths": [4, 10, 50], "figure_depths": [50], "tv_goal": 0.005,
                 "train_depths": [4], "train_steps": 10, "train_samples": 1000},
    "topology": {"rank_points": 40, "dim": 2, "scale": 1.5, "neurons": [1, 2], "seeds": [0], "steps": 30,
                 "samples": 2000, "ridge_grid": 15},
    "relu": {"mode_seeds": [0], "points": 100, "pairs": ["product"], "layers": 2, "steps": 20, "checkpoints": 2,
             "samples": 2000, "train_samples": 2000, "figure_grid": 15},
    "depth": {"householder_dims": [2], "kappas": [0.5], "planar_dims": [2], "u_max": 1.0, "planar_above": 0,
              "eps": 0.1, "seeds": [0], "steps": 20, "lr": 0.05, "batch_size": 256, "train_samples": 512,
              "tv_samples": 2000, "level": 0.95, "dtype": "float64"},
    "rezende": {"energies": ["U1"], "families": ["planar"], "depths": [1, 2], "steps": 20, "samples": 2000,
                "figure_points": 12},
    "vae": {"data": "digits", "posteriors": ["vae", "planar16"], "seeds": [0], "latent": 2, "hidden": 16,
            "epochs": 1, "warmup": 0, "patience": None, "nll_samples": 4, "z": 2.0},
}


def tiny_sections():
    """Every section of the report with the settings of ``TINY`` (in both modes)."""
    return tuple(dataclasses.replace(s, settings={"quick": TINY[s.key], "full": TINY[s.key]} if TINY[s.key] else {})
                 for s in SECTIONS)


@pytest.fixture(scope="session")
def tiny_report(tmp_path_factory):
    """``(directory, results)`` of a report of :func:`tiny_sections`."""
    out = tmp_path_factory.mktemp("tiny") / "report"
    return out, reproduce(out, tiny_sections())
