import math

import pytest
import torch

from flowprobe.distributions import Confined, RezendeEnergy, load_energy, rezende_energy
from flowprobe.metrics import log_partition


def test_u1_matches_the_formula_at_a_point():
    z = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    r = math.hypot(1.0, -0.5)
    expected = 0.5 * ((r - 2) / 0.4) ** 2 - math.log(math.exp(-0.5 * (-1 / 0.6) ** 2) + math.exp(-0.5 * (3 / 0.6) ** 2))
    assert float(RezendeEnergy(1)(z)) == pytest.approx(expected, abs=1e-12)


def test_u3_u4_match_the_formulas_at_a_point():
    z1, z2 = 0.7, -1.2
    w1 = math.sin(2 * math.pi * z1 / 4)
    w2 = 3 * math.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
    w3 = 3 / (1 + math.exp(-(z1 - 1) / 0.3))
    u3 = -math.log(math.exp(-0.5 * ((z2 - w1) / 0.35) ** 2) + math.exp(-0.5 * ((z2 - w1 + w2) / 0.35) ** 2))
    u4 = -math.log(math.exp(-0.5 * ((z2 - w1) / 0.4) ** 2) + math.exp(-0.5 * ((z2 - w1 + w3) / 0.35) ** 2))
    z = torch.tensor([[z1, z2]], dtype=torch.float64)
    assert float(RezendeEnergy(3)(z)) == pytest.approx(u3, abs=1e-12)
    assert float(RezendeEnergy(4)(z)) == pytest.approx(u4, abs=1e-12)


def test_raw_u2_is_improper_and_confined_u2_is_proper():
    raw = RezendeEnergy(2)
    # the mass on [-L, L]^2 grows linearly with L: no normalising constant
    grow = [log_partition(raw, bound, 30 * bound) for bound in (4, 8, 16)]
    assert grow[1] - grow[0] == pytest.approx(math.log(2), abs=0.01)
    assert grow[2] - grow[1] == pytest.approx(math.log(2), abs=0.01)
    proper = rezende_energy("U2")
    assert isinstance(proper, Confined)
    # exact value: ∫ exp(-½((z2-w1)/0.4)²) dz2 = 0.4√(2π) for every z1; in z1: 8 + 2·0.2·√(π/2)
    exact = math.log(0.4 * math.sqrt(2 * math.pi) * (8 + 2 * 0.2 * math.sqrt(math.pi / 2)))
    assert log_partition(proper, 6.0, 601) == pytest.approx(exact, abs=1e-6)
    assert log_partition(proper, 8.0, 801) == pytest.approx(exact, abs=1e-6)


@pytest.mark.parametrize("name", ["U1", "U3", "U4"])
def test_log_z_converges_on_the_grid(name):
    energy = rezende_energy(name)
    assert log_partition(energy, 6.0, 481) == pytest.approx(log_partition(energy, 7.0, 841), abs=1e-6)


def test_confinement_leaves_the_inside_alone():
    z = torch.tensor([[3.9, 0.3], [-4.5, 0.1], [5.0, 0.0]], dtype=torch.float64)
    base, wall = RezendeEnergy(3), Confined(RezendeEnergy(3))
    diff = wall(z) - base(z)
    assert diff.tolist() == pytest.approx([0.0, 0.5 * 2.5**2, 0.5 * 5.0**2])


def test_user_energy_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("def quadratic(z):\n    return 0.5 * (z ** 2).sum(-1)\n\ndef broken(z):\n    return z\n")
    energy = load_energy(f"{path}:quadratic")
    assert log_partition(energy) == pytest.approx(math.log(2 * math.pi), abs=1e-8)
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_energy(f"{path}:missing")
    with pytest.raises(ValueError, match="must return a tensor of shape \\(N,\\)"):
        load_energy(f"{path}:broken")
    with pytest.raises(FileNotFoundError):
        load_energy(f"{tmp_path / 'nope.py'}:f")
    with pytest.raises(ValueError, match="unknown energy 'U7'"):
        load_energy("U7")
