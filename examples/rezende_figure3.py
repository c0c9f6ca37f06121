"""Rezende & Mohamed's Figure 3: U1–U4 × K = 2, 8, 32 × planar / radial, reverse KL.

Same as ``flowprobe plot rezende --out DIR --steps N``; writes ``figure3.png``, ``table.md`` and
``table.json`` and prints the KL table. U2–U4 are the confined (proper) versions.
Run: ``python examples/rezende_figure3.py [steps] [out]`` (single thread).
"""

import sys

import torch

from flowprobe.cli import main

torch.set_num_threads(1)
steps = sys.argv[1] if len(sys.argv) > 1 else "20000"
out = sys.argv[2] if len(sys.argv) > 2 else "rezende-out"
sys.exit(main(["plot", "rezende", "--steps", steps, "--out", out]))
