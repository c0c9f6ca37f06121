"""Run functions for tests/test_sweep.py, importable by name in worker processes and Ray workers.

Run as ``python -m tests.sweep_fns STORE NAME FN N WORKERS`` it is a sweep driver (for the tests that
kill a sweep or run two at once) and prints its summary as JSON.
"""

import json
import os
import signal
import sys
import time
from dataclasses import asdict

import numpy as np
import torch


def square(params):
    return {"y": params["x"] ** 2}


def train(params):
    """A few Adam steps on data from the global generators, plus draws from the run's own seed.

    With ``params["crash"]`` the process kills itself instead (a worker dying mid-run).
    """
    if params.get("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    x = torch.randn(128, 4)
    y = x @ torch.randn(4, 1) + 0.1 * torch.randn(128, 1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(params["steps"]):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    own = torch.Generator().manual_seed(params["_seed"])
    return {
        "loss": loss.item(),
        "numpy": float(np.random.standard_normal()),
        "own": torch.rand(2, generator=own).tolist(),
        "threads": torch.get_num_threads(),
    }


def flaky(params):
    """Fails for x = 3 while the environment variable SWEEP_FLAKY is set."""
    if params["x"] == 3 and os.environ.get("SWEEP_FLAKY"):
        raise ValueError(f"x = {params['x']} is\nunlucky")
    return square(params)


def sleepy(params):
    """Sleeps SWEEP_SLEEP seconds (0 if unset): slow in a driver under test, instant when re-run in the test."""
    time.sleep(float(os.environ.get("SWEEP_SLEEP", "0")))
    return {"pid": os.getpid()}


def tensor_result(params):
    return {"y": torch.ones(1)}


def list_result(params):
    return [params["x"]]


def main(argv):
    from flowprobe.sweep import Sweep, run_sweep

    store, name, fn, n, workers = argv
    sweep = Sweep(name, f"tests.sweep_fns:{fn}", {"x": list(range(int(n)))})
    summary = run_sweep(sweep, store, workers=int(workers), progress=False)
    print(json.dumps(asdict(summary)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
