"""Section 6: minimum depth against the dimension (result 4; issue 12, ``flowprobe.theory.depth``).

Hook for the lead: once :mod:`flowprobe.theory.depth` is merged, write ``run(ctx) -> SectionOutput``
here and pass it as ``SECTION``'s ``run`` (settings per mode in ``settings``). What the section is to
measure: for Householder flows on ``q = N(0, Λ)``, ``p = N(0, Λ′)`` the bracket of ``T_ε`` against
``d`` (the proven lower bound ``d/2`` and the smallest depth at which a trained flow's TV interval
lies below ``ε``), and for bounded planar flows on ``N(0, I)`` → ``N(R e₁, I)`` the measured upper
bound against the line ``(R − 2Φ⁻¹((1 + ε)/2))/Δ``; checks: the bracket closes at ``d/2``
(Householder) and no measured upper bound falls below the lower bound (planar). Until then the
section is shown as not available in this build.
"""

from __future__ import annotations

from flowprobe.report.core import Section

__all__ = ["SECTION"]

SECTION = Section(
    key="depth",
    number=6,
    title="Minimum depth against the dimension",
    claim="Householder flows and planar flows with bounded parameters need a number of layers that grows with "
          "the dimension d to come within TV ε of some targets.",
    run=None,
    requires=("flowprobe.theory.depth",),
    issue="issue 12",
)
