"""Invertible residual layers, one family per module.

Convention: layers map source → data, ``x, logdet = layer(z)``; ``z, logdet_inv = layer.inverse(x)``.
"""

from flowprobe.layers.base import FlowLayer, InverseNotAvailable, Invertibility
from flowprobe.layers.householder import Householder
from flowprobe.layers.planar import Planar
from flowprobe.layers.radial import Radial
from flowprobe.layers.sylvester import GeneralSylvester, Sylvester

__all__ = [
    "FlowLayer",
    "GeneralSylvester",
    "Householder",
    "InverseNotAvailable",
    "Invertibility",
    "Planar",
    "Radial",
    "Sylvester",
]
