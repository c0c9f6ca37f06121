"""``flowprobe reproduce``: every claim of Kong & Chaudhuri (AISTATS 2020), measured, in one report.

* :mod:`flowprobe.report.core`: sections, checks, verdicts, outputs (the data model);
* :mod:`flowprobe.report.sections`: one module per section, registered in ``SECTIONS``;
* :mod:`flowprobe.report.runner`: running sections (in parallel processes), the cache, the report
  directory;
* :mod:`flowprobe.report.render`: the self-contained HTML page;
* :mod:`flowprobe.report.figures`: the report's own figures.

From Python: ``reproduce(out, SECTIONS, mode="quick")`` returns the content of ``results.json``.
"""

from flowprobe.report.core import Check, Context, Section, SectionOutput, check, verdict
from flowprobe.report.runner import exit_status, reproduce

__all__ = ["Check", "Context", "Section", "SectionOutput", "check", "exit_status", "reproduce", "verdict"]
