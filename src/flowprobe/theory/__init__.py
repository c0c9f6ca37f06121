"""Diagnostics for the expressive-power results of Kong & Chaudhuri (AISTATS 2020), one module per
result: ``approx1d`` (universal approximation on R), ``topology`` (topology matching), ``depth``
(minimum-depth lower bounds) and ``tv`` (total-variation estimates)."""
