"""Invertible residual layers, one family per module, each a stack of ``K`` layers.

Convention: layers map source → data, ``x, logdet = layer(z)``; ``z, logdet_inv = layer.inverse(x)``.
Every family registers itself (:mod:`flowprobe.layers.registry`); importing this package registers
the built-ins.
"""

from flowprobe.layers.base import FlowLayer, InverseNotAvailable, Invertibility, LayerView, fused_kernels
from flowprobe.layers.householder import Householder
from flowprobe.layers.planar import Planar
from flowprobe.layers.radial import Radial
from flowprobe.layers.registry import Family, Option, families, family_table, get_family, register
from flowprobe.layers.sylvester import GeneralSylvester, Sylvester

__all__ = [
    "Family",
    "FlowLayer",
    "GeneralSylvester",
    "Householder",
    "InverseNotAvailable",
    "Invertibility",
    "LayerView",
    "Option",
    "Planar",
    "Radial",
    "Sylvester",
    "families",
    "family_table",
    "fused_kernels",
    "get_family",
    "register",
]
