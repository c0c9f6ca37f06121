import pytest
import torch

from flowprobe.demo import JOBS, exactness_checks
from flowprobe.spec import build_flow, parse_spec
from flowprobe.train import FitConfig


def test_exactness_checks_of_a_flow():
    torch.manual_seed(1)
    result = exactness_checks(build_flow("planar:3:tanh+radial:2", 2), points=201)
    assert result["max_abs_difference"] < 1e-10
    assert result["density_mass_on_grid"] == pytest.approx(1.0, abs=1e-3)


def test_demo_jobs_are_valid_and_short():
    for _, spec, kind, _name, settings in JOBS:
        parse_spec(spec)
        assert kind in ("energy", "data") and FitConfig(**settings).steps <= 6000
