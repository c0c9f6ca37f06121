"""The sections of ``flowprobe reproduce``, one module each, registered in :data:`SECTIONS`.

A section module defines ``SECTION`` (a :class:`~flowprobe.report.core.Section`: key, number,
title, one-sentence claim, settings per mode, required modules) and the module-level function it
names, ``run(ctx) -> SectionOutput``. Adding a section is its module and one line here.
"""

from __future__ import annotations

from flowprobe.report.core import Section
from flowprobe.report.sections import approx1d, depth, relu, rezende, stages, topology, two_layer, vae

__all__ = ["SECTIONS"]

SECTIONS: tuple[Section, ...] = (
    stages.SECTION,
    two_layer.SECTION,
    approx1d.SECTION,
    topology.SECTION,
    relu.SECTION,
    depth.SECTION,
    rezende.SECTION,
    vae.SECTION,
)
