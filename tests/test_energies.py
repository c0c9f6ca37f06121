import math

import pytest
import torch

from flowprobe import Flow, Planar
from flowprobe.distributions import Confined, DiagonalNormal, RezendeEnergy, load_energy, rezende_energy
from flowprobe.metrics import log_partition, reverse_kl


def test_u1_matches_the_formula_at_a_point():
    z = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    r = math.hypot(1.0, -0.5)
    expected = 0.5 * ((r - 2) / 0.4) ** 2 - math.log(math.exp(-0.5 * (-1 / 0.6) ** 2) + math.exp(-0.5 * (3 / 0.6) ** 2))
    assert float(RezendeEnergy(1)(z)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_u1_as_evaluated_equals_the_written_formula_with_its_gradient(dtype):
    """U1 is evaluated with its squares expanded and an elementwise radius: the same values and gradients
    as the formula as written (norm, log-sum-exp of the two Gaussians), 0 gradient at the origin included."""
    z = torch.cat([torch.randn(2000, 2, dtype=torch.float64) * 3, torch.tensor([[0.0, 0.0], [2.0, 0.0], [-2.0, 1e-30],
                                                                              [1e-30, 0.0], [0.0, -3.0]])])

    def written(x):
        ring = 0.5 * ((x.norm(dim=-1) - 2) / 0.4) ** 2
        return ring - torch.logaddexp(-0.5 * ((x[:, 0] - 2) / 0.6) ** 2, -0.5 * ((x[:, 0] + 2) / 0.6) ** 2)

    x = z.to(dtype).requires_grad_(True)
    value = RezendeEnergy(1)(x)
    (grad,) = torch.autograd.grad(value.sum(), x)
    exact = z.clone().requires_grad_(True)
    expected = written(exact)
    (expected_grad,) = torch.autograd.grad(expected.sum(), exact)
    rtol = 1e-13 if dtype == torch.float64 else 1e-5
    scale = expected.detach().abs().clamp_min(1)
    assert ((value.double() - expected.detach()).abs() / scale).max() < rtol
    # the written formula's norm has gradient 0 below its float underflow; away from the origin they agree
    away = z.norm(dim=-1) > 1e-6
    assert ((grad.double() - expected_grad)[away].abs() / expected_grad[away].abs().clamp_min(1)).max() < 10 * rtol
    assert grad[2000].tolist() == [0.0, 0.0] and torch.isfinite(grad).all()


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
    # the mass of the paper's U2 on [-L, L]^2 grows linearly with L: no normalising constant, refused
    with pytest.raises(ValueError, match="energy U2 is not normalisable"):
        log_partition(RezendeEnergy(2))
    proper = rezende_energy("U2")
    assert isinstance(proper, Confined)
    # exact value: ∫ exp(-½((z2-w1)/0.4)²) dz2 = 0.4√(2π) for every z1; in z1: 8 + 2·0.2·√(π/2)
    exact = math.log(0.4 * math.sqrt(2 * math.pi) * (8 + 2 * 0.2 * math.sqrt(math.pi / 2)))
    result = log_partition(proper)
    assert abs(result.value - exact) <= result.error <= 1e-6
    assert abs(result.value - exact) < 1e-7


@pytest.mark.parametrize("name", ["U1", "U3", "U4"])
def test_log_z_converges_on_the_grid(name):
    energy = rezende_energy(name)
    result = log_partition(energy)
    assert result.error <= 1e-6
    wider = log_partition(energy, bound=1.5 * result.bound)
    assert result.value == pytest.approx(wider.value, abs=result.error + wider.error)


def test_log_z_of_user_energies_grows_its_domain_or_refuses(tmp_path):
    """Issue 11 item 5: p = N(0, 10²I) had log Z = 4.85 on [−6, 6]² (exact 6.44) and KL(q‖p) = −1.59 for
    q = p; U = −‖z‖² and U = 0 got finite KLs."""
    path = tmp_path / "energies.py"
    path.write_text("def wide(z):\n    return 0.5 * (z ** 2).sum(-1) / 100.0\n\n"
                    "def negative(z):\n    return -(z ** 2).sum(-1)\n\ndef zero(z):\n    return 0.0 * z.sum(-1)\n")
    energy = load_energy(f"{path}:wide")
    wide = log_partition(energy)
    assert abs(wide.value - math.log(2 * math.pi * 100)) <= wide.error <= 1e-6
    assert wide.bound >= 48
    layer = Planar(2)
    layer.set_constrained(torch.zeros(2), torch.tensor([1.0, 0.0]), 0.0)  # the identity: q = p
    q = Flow(DiagonalNormal(torch.zeros(2), torch.full((2,), 10.0)), [layer])
    assert reverse_kl(q, energy, wide.value, n=2000)["kl"] == pytest.approx(0.0, abs=1e-6)
    for name in ("negative", "zero"):
        with pytest.raises(ValueError, match="is not normalisable as far as quadrature can tell"):
            log_partition(load_energy(f"{path}:{name}"))


def test_confinement_leaves_the_inside_alone():
    z = torch.tensor([[3.9, 0.3], [-4.5, 0.1], [5.0, 0.0]], dtype=torch.float64)
    base, wall = RezendeEnergy(3), Confined(RezendeEnergy(3))
    diff = wall(z) - base(z)
    assert diff.tolist() == pytest.approx([0.0, 0.5 * 2.5**2, 0.5 * 5.0**2])


def test_user_energy_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("def quadratic(z):\n    return 0.5 * (z ** 2).sum(-1)\n\ndef broken(z):\n    return z\n")
    energy = load_energy(f"{path}:quadratic")
    assert log_partition(energy).value == pytest.approx(math.log(2 * math.pi), abs=1e-8)
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_energy(f"{path}:missing")
    with pytest.raises(ValueError, match="must return a tensor of shape \\(N,\\)"):
        load_energy(f"{path}:broken")
    with pytest.raises(FileNotFoundError):
        load_energy(f"{tmp_path / 'nope.py'}:f")
    with pytest.raises(ValueError, match="unknown energy 'U7'"):
        load_energy("U7")
