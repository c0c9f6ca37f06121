"""Interrupting a writer process in tests."""

import os
import signal
import subprocess
import time
from collections.abc import Callable


def kill_9_when(driver: subprocess.Popen, ready: Callable[[], bool], timeout: float) -> None:
    """Poll ``ready()`` until it holds (a ``ValueError``, e.g. a store created but not yet initialised,
    counts as not ready), then ``kill -9`` the driver and reap it. Fails, with the driver's stderr,
    if the driver ends first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        ended = driver.poll() is not None
        assert time.monotonic() < deadline and not ended, driver.stderr.read() if ended else "too slow"
        try:
            if ready():
                break
        except ValueError:
            pass
        time.sleep(0.05)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
