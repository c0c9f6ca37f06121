"""A family registered from outside flowprobe (``custom_family.py``, under 80 lines) works everywhere
without a change under ``src/``: spec strings, ``Flow``, ``fit``, ``log_prob`` through its inverse,
ensembles, and the generic harness (which runs its examples)."""

import torch
from tests.helpers import CASES
from tests.layers.custom_family import ElementwiseAffine

import flowprobe as fp
from flowprobe.layers import families, family_table


def test_it_is_registered_with_its_examples_and_documented():
    assert families()["affine"].cls is ElementwiseAffine
    assert {"affine", "affine-narrow"} <= set(CASES)
    assert "| `affine` | `ElementwiseAffine` | `exp(s) ⊙ z + t` | exact |" in family_table()


def test_spec_strings_build_it_with_its_options():
    flow = fp.build_flow("affine:2:s=0.5+planar:3:tanh", 2, torch.float64)
    first = flow.stacks[0]
    assert isinstance(first, ElementwiseAffine) and first.depth == 2 and first.max_log_scale == 0.5
    assert flow.depth == 5


def test_fit_and_log_prob_through_its_inverse():
    torch.manual_seed(0)
    data = torch.randn(2000, 2, dtype=torch.float64) * torch.tensor([2.0, 0.5], dtype=torch.float64) + 1.0
    flow = fp.build_flow("affine:1", 2, torch.float64)
    fp.fit(flow, data=data, steps=300, lr=0.05, batch_size=256)
    log_scale, shift = flow.stacks[0].constrained()
    torch.testing.assert_close(log_scale[0].exp(), torch.tensor([2.0, 0.5], dtype=torch.float64), atol=0.1, rtol=0)
    torch.testing.assert_close(shift[0], torch.ones(2, dtype=torch.float64), atol=0.1, rtol=0)
    x, log_p = flow.rsample_and_log_prob(100)
    torch.testing.assert_close(flow.log_prob(x), log_p, atol=1e-12, rtol=0)


def test_it_works_in_an_ensemble():
    flow = fp.build_flow("affine:2+planar:2", 2, torch.float64, ensemble=4)
    z = torch.randn(4, 10, 2, dtype=torch.float64)
    x, logdet = flow(z)
    for e in range(4):
        x_e, logdet_e = flow.member(e)(z[e])
        torch.testing.assert_close(x[e], x_e, atol=1e-12, rtol=0)
        torch.testing.assert_close(logdet[e], logdet_e, atol=1e-12, rtol=0)
    torch.testing.assert_close(flow.inverse(x)[0], z, atol=1e-12, rtol=0)
