"""One checkout's timing worker for ``compare_checkouts.py`` (not run by hand).

Started as ``python checkout_worker.py CHECKOUT`` with ``CHECKOUT/src`` first on ``PYTHONPATH``, it
imports that checkout's own ``benchmarks/compare_anchors.py`` and answers JSON lines on stdin:

* ``{"op": "prepare", "row": KEY, "libs": [...], "target": S}`` builds the row's callables for the
  libraries (seed 0, as ``compare_anchors.time_rows`` does), warms them up and calibrates the calls
  per repetition to about ``S`` seconds; answers ``{"calls": {lib: n}}`` (a library that cannot run
  the row answers its reason instead of a count).
* ``{"op": "rep", "lib": LIB}`` times one repetition and answers ``{"rate": units per second}``.

Keeping both checkouts' workers alive lets the driver alternate single repetitions between them, so
that a change in the machine's speed (other jobs, a throttled virtual CPU) hits both alike.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    sys.path.insert(0, str(Path(sys.argv[1]) / "benchmarks"))
    import compare_anchors as anchors
    import torch

    torch.set_num_threads(anchors.THREADS)
    rows = {row.key: row for row in anchors.rows()}
    row, fns, calls = None, {}, {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "prepare":
            row = rows[request["row"]]
            torch.manual_seed(0)
            fns = {lib: row.prepare(lib) for lib in request["libs"]}
            calls = {}
            for lib, fn in fns.items():
                if isinstance(fn, str):
                    calls[lib] = fn
                    continue
                fn()
                start = time.perf_counter()
                fn()
                calls[lib] = max(1, int(request["target"] / max(time.perf_counter() - start, 1e-6)))
            answer = {"calls": calls}
        else:
            fn, n = fns[request["lib"]], calls[request["lib"]]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            answer = {"rate": n * row.per_call / (time.perf_counter() - start)}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
