"""FlatAdamax takes torch.optim.Adamax's steps, shares its state dict, and falls back to it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flowprobe.optim import FlatAdamax

TOLERANCE = {torch.float32: 2e-6, torch.float64: 1e-14}


class Params(nn.Module):
    """Parameters of several shapes, one of them not contiguous."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.matrix = nn.Parameter(torch.randn(6, 4, generator=g, dtype=dtype))
        self.vector = nn.Parameter(torch.randn(4, generator=g, dtype=dtype))
        self.cube = nn.Parameter(torch.randn(2, 3, 5, generator=g, dtype=dtype))
        self.transposed = nn.Parameter(torch.randn(7, 3, generator=g, dtype=dtype).t())
        self.scalar = nn.Parameter(torch.randn((), generator=g, dtype=dtype))

    def loss(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(100 + step)
        total = self.scalar.new_zeros(())
        for p in self.parameters():
            target = torch.randn(p.shape, generator=g, dtype=p.dtype)
            total = total + (torch.sin(p) * target).sum() + 0.1 * (p * p * target.abs()).sum()
        return total


def _train(model: Params, opt: torch.optim.Optimizer, steps: range, skip: str | None = None) -> None:
    for step in steps:
        opt.zero_grad()
        model.loss(step).backward()
        if skip is not None and step % 3 == 1:
            getattr(model, skip).grad = None  # this parameter has no gradient at this step
        opt.step()


def _assert_same(a: Params, b: Params, opt_a: torch.optim.Optimizer, opt_b: torch.optim.Optimizer) -> None:
    tol = TOLERANCE[a.matrix.dtype]
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
        for key in ("exp_avg", "exp_inf", "step"):
            torch.testing.assert_close(opt_a.state[p][key], opt_b.state[q][key], rtol=tol, atol=tol)


def _pair(dtype: torch.dtype, **settings: float) -> tuple[Params, Params, FlatAdamax, torch.optim.Adamax]:
    flat_model = Params(dtype)
    reference = copy.deepcopy(flat_model)
    return (flat_model, reference, FlatAdamax(flat_model.parameters(), lr=1e-2, eps=1e-7, **settings),
            torch.optim.Adamax(reference.parameters(), lr=1e-2, eps=1e-7, foreach=True, **settings))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flat_adamax_takes_the_steps_of_adamax(dtype: torch.dtype) -> None:
    model, reference, opt, ref_opt = _pair(dtype)
    start = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, range(30))
    _train(reference, ref_opt, range(30))
    assert len(opt._flat) == 1  # the flat step ran
    _assert_same(model, reference, opt, ref_opt)
    moved = min(float((p.detach() - s).abs().max()) for p, s in zip(model.parameters(), start, strict=True))
    assert moved > 0.02  # 30 steps of lr 1e-2 moved every parameter
    assert float(opt.state[model.matrix]["step"]) == 30.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_dicts_move_between_flat_adamax_and_adamax(dtype: torch.dtype) -> None:
    model, reference, opt, ref_opt = _pair(dtype)
    _train(model, opt, range(10))
    _train(reference, ref_opt, range(10))
    # swap: the flat optimiser continues from Adamax's state, Adamax from the flat one's
    swapped_flat, swapped_ref = copy.deepcopy(reference), copy.deepcopy(model)
    opt_from_ref = FlatAdamax(swapped_flat.parameters(), lr=1e-2, eps=1e-7)
    opt_from_ref.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # Adamax keeps loaded step tensors
    ref_from_flat = torch.optim.Adamax(swapped_ref.parameters(), lr=1e-2, eps=1e-7, foreach=True)
    ref_from_flat.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(swapped_flat, opt_from_ref, range(10, 20))
    _train(swapped_ref, ref_from_flat, range(10, 20))
    _train(model, opt, range(10, 20))
    _assert_same(swapped_flat, model, opt_from_ref, opt)
    _assert_same(swapped_ref, model, ref_from_flat, opt)
    # a flat optimiser that loads a state dict rebuilds its buffers from it
    opt.load_state_dict(copy.deepcopy(ref_from_flat.state_dict()))
    _train(model, opt, range(20, 25))
    _train(swapped_ref, ref_from_flat, range(20, 25))
    _assert_same(model, swapped_ref, opt, ref_from_flat)


@pytest.mark.parametrize(("settings", "skip"), [({}, "cube"), ({"weight_decay": 0.1}, None)])
def test_what_the_flat_step_does_not_cover_takes_adamax_step(settings: dict, skip: str | None) -> None:
    model, reference, opt, ref_opt = _pair(torch.float64, **settings)
    _train(model, opt, range(12), skip)
    _train(reference, ref_opt, range(12), skip)
    _assert_same(model, reference, opt, ref_opt)
    for o in (opt, ref_opt):  # a setting changed between steps: weight decay on, then off again
        o.param_groups[0]["weight_decay"] = 0.05
    _train(model, opt, range(12, 14), skip)
    _train(reference, ref_opt, range(12, 14), skip)
    for o in (opt, ref_opt):
        o.param_groups[0]["weight_decay"] = 0.0
    _train(model, opt, range(14, 16), skip)
    _train(reference, ref_opt, range(14, 16), skip)
    _assert_same(model, reference, opt, ref_opt)
    assert float(opt.state[model.matrix]["step"]) == 16.0
    if skip is not None:  # skipped at steps 1, 4, 7, 10, 13: five steps fewer
        assert float(opt.state[model.cube]["step"]) == 11.0


def test_a_group_of_mixed_dtypes_takes_adamax_step() -> None:
    model, reference = Params(torch.float64), Params(torch.float64)
    for m in (model, reference):
        m.vector.data = m.vector.data.float()  # one float32 parameter among float64 ones
    opt = FlatAdamax(model.parameters(), lr=1e-2, eps=1e-7)
    ref_opt = torch.optim.Adamax(reference.parameters(), lr=1e-2, eps=1e-7, foreach=True)
    _train(model, opt, range(6))
    _train(reference, ref_opt, range(6))
    assert not opt._flat
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_parameter_groups_each_take_their_own_flat_step() -> None:
    model, reference = Params(torch.float64), Params(torch.float64)

    def groups(m: Params) -> list[dict]:
        return [{"params": [m.matrix, m.vector]}, {"params": [m.cube, m.transposed, m.scalar], "lr": 3e-3}]

    opt = FlatAdamax(groups(model), lr=1e-2, eps=1e-7)
    ref_opt = torch.optim.Adamax(groups(reference), lr=1e-2, eps=1e-7, foreach=True)
    _train(model, opt, range(15))
    _train(reference, ref_opt, range(15))
    assert len(opt._flat) == 2
    _assert_same(model, reference, opt, ref_opt)


def test_hooks_run_once_per_step_and_a_closure_gives_its_loss() -> None:
    torch.optim.Adamax([nn.Parameter(torch.zeros(1))])  # Optimizer hooks Adamax.step once an instance exists
    model, reference, opt, ref_opt = _pair(torch.float64)
    calls: list[int] = []
    opt.register_step_post_hook(lambda *_: calls.append(1))
    _train(model, opt, range(3))
    _train(model, opt, range(4, 5), "vector")  # 4 % 3 == 1: Adamax's own step
    assert len(calls) == 4

    def closure(m: Params, o: torch.optim.Optimizer) -> float:
        o.zero_grad()
        loss = m.loss(7)
        loss.backward()
        return float(loss.detach())

    _train(reference, ref_opt, range(3))
    _train(reference, ref_opt, range(4, 5), "vector")
    assert opt.step(lambda: closure(model, opt)) == ref_opt.step(lambda: closure(reference, ref_opt))
    assert len(calls) == 5
    _assert_same(model, reference, opt, ref_opt)
