"""Diagnostics for the expressive-power results of Kong & Chaudhuri (AISTATS 2020); the math is in
``docs/theory/``.

* ``approx1d`` (with ``targets1d``): universal approximation on R, by construction, with exact TV.
* ``topology``: topology matching — the gradient-set rank, the Gaussian neuron bound and its floor,
  the ReLU pointwise condition; ``topology_experiments`` trains flows on these results and
  ``topology_figures`` draws them.
* ``depth`` (with ``depth_pairs``, ``depth_experiments``, ``depth_figures``): minimum depth — proven
  lower bounds, the two constructions, brackets measured by sweeps of ensemble training runs.
* ``tv``: total variation — closed forms, exact on R, Monte Carlo with confidence intervals in R^d.
"""
