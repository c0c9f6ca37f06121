r"""Optimisers whose step runs on one flat buffer per parameter group.

A step of :class:`torch.optim.Adamax` (even with ``foreach=True``, whose CPU path loops over the
tensors in C++) costs ~10 operations per parameter tensor plus their bookkeeping in Python: for the
small networks of a VAE on 8 × 8 digits (16 tensors, 70 000 numbers) that is most of a millisecond,
a fifth of a training step. :class:`FlatAdamax` keeps each group's moments in one contiguous buffer
and does the same arithmetic in ~10 operations on all the group's numbers at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["FlatAdamax"]


def _step_dtype() -> torch.dtype:
    """Adamax's step counters: float64 under a float64 default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _adamax_step(optimiser: torch.optim.Adamax) -> None:
    """Adamax's own step, without the optimiser hooks a second time (``Optimizer`` wraps a class's
    ``step`` with them once an instance exists; the subclass's ``step`` has run them already)."""
    step = torch.optim.Adamax.step
    (step.__wrapped__ if getattr(step, "hooked", False) else step)(optimiser)


class _FlatGroup:
    """One parameter group's flat buffers and, for each parameter, the views of them that its state holds."""

    def __init__(self, params: list[Tensor], state: dict[Tensor, dict[str, Any]], steps: int) -> None:
        first = params[0]
        sizes = [p.numel() for p in params]
        total = sum(sizes)

        def buffer(key: str | None) -> tuple[Tensor, list[Tensor]]:
            flat = torch.zeros(total, dtype=first.dtype, device=first.device)
            views = [part.view(p.shape) for part, p in zip(flat.split(sizes), params, strict=True)]
            if key is not None and steps:
                torch._foreach_copy_(views, [state[p][key] for p in params])
            return flat, views

        self.params = params
        (self.exp_avg, exp_avgs), (self.exp_inf, exp_infs) = buffer("exp_avg"), buffer("exp_inf")
        (self.grad, self.grads), (self.update, self.updates) = buffer(None), buffer(None)
        for p, avg, inf in zip(params, exp_avgs, exp_infs, strict=True):
            step = state[p]["step"] if steps else torch.tensor(0.0, dtype=_step_dtype())
            state[p].update(step=step, exp_avg=avg, exp_inf=inf)
        self.views = [(state[p]["step"], state[p]["exp_avg"], state[p]["exp_inf"]) for p in params]
        self.steps = [step for step, _, _ in self.views]
        self.one = torch.ones_like(self.steps[0])  # a tensor: the CPU loop of _foreach_add_ wraps a number each time

    def holds(self, params: list[Tensor], state: dict[Tensor, dict[str, Any]]) -> bool:
        """Whether these buffers are still the group's state (not replaced by ``load_state_dict``)."""
        if len(params) != len(self.params) or any(p is not q for p, q in zip(params, self.params, strict=True)):
            return False
        return all(state[p].get("step") is step and state[p].get("exp_avg") is avg and state[p].get("exp_inf") is inf
                   for p, (step, avg, inf) in zip(params, self.views, strict=True))


class FlatAdamax(torch.optim.Adamax):
    r"""Adamax (Kingma & Ba, 2015, §7.1) with each parameter group's moments in one flat buffer.

    The update is :class:`torch.optim.Adamax`'s, for gradient ``g`` at step ``t``:
    ``m ← m + (1 − β₁)(g − m)``, ``u ← max(β₂ u, |g| + ε)``, ``θ ← θ − (lr/(1 − β₁ᵗ)) m/u``; only the
    layout differs: ``m``, ``u``, the gradients and the update of a group are views of four contiguous
    buffers (two more than Adamax keeps: the gathered gradients and the update, each the size of the
    group's parameters), so that a step is a dozen operations whatever the number of tensors. The state dict is
    Adamax's (per parameter ``step``, ``exp_avg``, ``exp_inf``): checkpoints move between the two, and
    after :meth:`load_state_dict` the buffers are rebuilt from the loaded state. Groups the flat step
    does not cover — weight decay, ``maximize``, complex or sparse parameters, a parameter without a
    gradient at this step, mixed dtypes or devices, parameters at different step counts — take
    Adamax's own step, so the result is Adamax's in every case (to rounding: the element order of the
    vectorised loops differs).

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate.
        betas: ``(β₁, β₂)``.
        eps: ``ε``.
        weight_decay: L2 penalty (taken by Adamax's own step).

    References:
        D. P. Kingma, J. Ba. Adam: A Method for Stochastic Optimization. ICLR 2015.
        https://arxiv.org/abs/1412.6980
    """

    def __init__(self, params: Iterable[Any], lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)
        self._flat: dict[int, _FlatGroup] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [self._flat_group(i, group) for i, group in enumerate(self.param_groups)]
        if any(flat is None for flat in groups):
            _adamax_step(self)  # for every group (the gradients are those of the closure above)
            self._flat.clear()  # the step counts may differ now: checked again at the next step
            return loss
        for group, flat in zip(self.param_groups, groups, strict=True):
            self._flat_step(group, flat)  # type: ignore[arg-type]
        return loss

    def _flat_group(self, index: int, group: dict[str, Any]) -> _FlatGroup | None:
        """The group's flat buffers if the flat step covers it (class docstring), else ``None``."""
        params: list[Tensor] = group["params"]
        if (not params or group["weight_decay"] != 0 or group["maximize"] or group["differentiable"]
                or group["capturable"] or any(p.grad is None or p.grad.is_sparse for p in params)):
            return None
        flat = self._flat.get(index)
        if flat is not None and flat.holds(params, self.state):
            return flat
        first = params[0]
        if any(p.is_complex() or p.dtype != first.dtype or p.device != first.device for p in params):
            return None
        started = [len(self.state[p]) > 0 for p in params]
        if any(started) and not all(started):
            return None
        steps = {float(self.state[p]["step"]) for p in params} if all(started) else {0.0}
        if len(steps) != 1 or not next(iter(steps)).is_integer():
            return None
        self._flat[index] = _FlatGroup(params, self.state, int(next(iter(steps))))
        return self._flat[index]

    @staticmethod
    def _flat_step(group: dict[str, Any], flat: _FlatGroup) -> None:
        beta1, beta2 = group["betas"]
        torch._foreach_copy_(flat.grads, [p.grad for p in flat.params])
        torch._foreach_add_(flat.steps, flat.one, alpha=1.0)
        flat.exp_avg.lerp_(flat.grad, 1 - beta1)
        flat.exp_inf.mul_(beta2)
        torch.maximum(flat.exp_inf, flat.grad.abs_().add_(group["eps"]), out=flat.exp_inf)
        step_size = -float(group["lr"]) / (1 - beta1 ** float(flat.steps[0]))  # as Adamax reads it
        torch.mul(flat.exp_avg, step_size, out=flat.update).div_(flat.exp_inf)
        torch._foreach_add_(flat.params, flat.updates)
