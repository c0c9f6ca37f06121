import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("FLOWPROBE_HYPOTHESIS_EXAMPLES", "30")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")

import tests.layers.custom_family  # noqa: F401, E402  (a family defined outside flowprobe, registered)

DTYPES = [torch.float32, torch.float64]

# benchmarks/gpu_check.sh runs the layer and flow tests with FLOWPROBE_TEST_DEVICE=cuda: every tensor and
# module a test creates without a device lands there, and the library must follow its inputs.
if os.environ.get("FLOWPROBE_TEST_DEVICE"):
    torch.set_default_device(os.environ["FLOWPROBE_TEST_DEVICE"])


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) for the session, started as ``--ray local`` starts it: the Ray tests
    share its start-up and its warm workers (a sweep uses an initialised Ray as it is)."""
    from flowprobe.sweep.executors import RayExecutor

    executor = RayExecutor("local", 2)
    yield
    executor.close()
