"""Section 8: VAEs with flow posteriors, in the form of van den Berg et al.'s Table 1 (issue 13,
``flowprobe.vae``).

Hook for the lead: once :mod:`flowprobe.vae` is merged, write ``run(ctx) -> SectionOutput`` here and
pass it as ``SECTION``'s ``run``. What the section is to measure: −ELBO and importance-sampled NLL
(mean ± std over seeds) on binarised digits (MNIST when its files are given) for no flow, planar
(K = 16, 80), radial, Householder and the three Sylvester variants; checks: every flow improves the
NLL over the plain VAE, and the best Sylvester variant is at least as good as planar K = 16. Until
then the section is shown as not available in this build.
"""

from __future__ import annotations

from flowprobe.report.core import Section

__all__ = ["SECTION"]

SECTION = Section(
    key="vae",
    number=8,
    title="VAEs with flow posteriors (van den Berg et al.'s Table 1)",
    claim="Flow posteriors improve a VAE's likelihood, and Sylvester flows do at least as well as planar flows.",
    run=None,
    requires=("flowprobe.vae",),
    issue="issue 13",
)
