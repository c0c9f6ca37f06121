"""A layer family defined outside flowprobe: what a user writes to add one (registered on import).

Imported by ``tests/conftest.py``, so the generic harness (``test_generic.py``), the constraint
tests and the spec parser see it like a built-in; ``test_custom_family.py`` checks the rest.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from flowprobe.layers import FlowLayer, Invertibility, Option, register


class AffineParams(NamedTuple):
    log_scale: Tensor  # (K, ..., d)
    shift: Tensor  # (K, ..., d)


@register(
    "affine",
    options=(Option("max_log_scale", float, aliases=("s",)),),
    formula="exp(s) ⊙ z + t",
    inverse="exact",
    examples=lambda dim: {"affine": {}, "affine-narrow": {"max_log_scale": 0.5}},
)
class ElementwiseAffine(FlowLayer):
    """``x = exp(s) ⊙ z + t`` with ``s = S tanh(ŝ/S)`` (``|s| < S``); log-det ``Σ s``; inverse exact."""

    def __init__(self, dim: int, max_log_scale: float = 3.0, *, layers: int = 1, ensemble=()) -> None:
        super().__init__(dim, layers, ensemble)
        if not max_log_scale > 0:
            raise ValueError(f"max_log_scale must be positive, got {max_log_scale}")
        self.max_log_scale = float(max_log_scale)
        self._init_parameters()

    def init_raw(self) -> dict[str, Tensor]:
        return {"s": 0.3 * torch.randn(self.dim), "t": 0.3 * torch.randn(self.dim)}

    def constrain(self, raw: dict[str, Tensor]) -> AffineParams:
        bound = self.max_log_scale
        return AffineParams(bound * torch.tanh(raw["s"] / bound), raw["t"])

    def transform(self, z: Tensor, p: AffineParams) -> tuple[Tensor, Tensor]:
        return z * p.log_scale.exp() + p.shift, p.log_scale.sum(-1) + z.new_zeros(z.shape[:-1])

    def invert(self, x: Tensor, p: AffineParams) -> tuple[Tensor, Tensor]:
        return (x - p.shift) * (-p.log_scale).exp(), -p.log_scale.sum(-1) + x.new_zeros(x.shape[:-1])

    def invertibility(self, layer: int | None = None) -> Invertibility:
        return Invertibility(True, 1.0, "always (exp(s) > 0)")
