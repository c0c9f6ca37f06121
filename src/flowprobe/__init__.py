"""flowprobe: residual normalizing flows (planar, radial, Sylvester, Householder) with exact
likelihood and inverses, and tools that measure what they can and cannot express.

Direction convention: layers and flows map source → data, ``x, logdet = layer(z)``.
"""

from flowprobe.activations import ACTIVATIONS, get_activation
from flowprobe.distributions import Density, DiagonalNormal, FullNormal, GaussianMixture, StandardNormal
from flowprobe.flow import Flow
from flowprobe.layers import (
    FlowLayer,
    GeneralSylvester,
    Householder,
    InverseNotAvailable,
    Invertibility,
    Planar,
    Radial,
    Sylvester,
)
from flowprobe.rundir import load_run
from flowprobe.spec import build_flow
from flowprobe.train import fit
from flowprobe.validation import set_validation, validation

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "Density",
    "DiagonalNormal",
    "Flow",
    "FlowLayer",
    "FullNormal",
    "GaussianMixture",
    "GeneralSylvester",
    "Householder",
    "InverseNotAvailable",
    "Invertibility",
    "Planar",
    "Radial",
    "StandardNormal",
    "Sylvester",
    "build_flow",
    "fit",
    "get_activation",
    "load_run",
    "set_validation",
    "validation",
]
