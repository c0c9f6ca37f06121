"""flowprobe against normflows and Pyro on the same work, timed side by side in one run.

Rows (see the README's "Performance" section):

(a) reverse-KL training on the U1 energy (Rezende & Mohamed 2015), K = 32, d = 2, batch 256, Adam;
(b) maximum-likelihood training on two-moons samples (needs the inverse), K = 32, d = 2, batch 256;
(c) ``log_prob`` of given data and sampling throughput, K = 16, d = 2 and d = 64, batch 4096;
(d) Sylvester (each variant) and Householder stacks at d = 64, K = 16, batch 4096;
(e) peak memory of one training step of (a) for K = 32 and K = 300 (fresh subprocess each).

Every library runs the same explicit loop (same loss, batch, Adam, lr); libraries alternate within
each repetition so machine load hits all of them alike, and each number is the median of
``--reps`` repetitions after a warm-up. Next to each speed the table gives the library's
log-det error against autograd (float64, max over points), so that speed is never bought with
wrong numbers. A library that cannot do a row (no inverse, no such layer) reads "cannot".
``--compiled`` adds a line per row (a): the same flowprobe flow with ``rsample_and_log_prob`` under
``torch.compile``, against the same anchors.

Run: ``PYTHONPATH=src python benchmarks/compare_anchors.py [--quick] [--json out.json]``
(``make bench``). normflows and Pyro are optional (``pip install .[bench]``); missing ones read
"not installed".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import flowprobe as fp
from flowprobe.data import load_data
from flowprobe.distributions import rezende_energy

LIBRARIES = ("flowprobe", "normflows", "pyro")
COMPILED = "flowprobe-compiled"  # rows (a) with --compiled: the same flow, its sampling under torch.compile
LR = 1e-3
BATCH_TRAIN = 256
BATCH_EVAL = 4096
THREADS = int(os.environ.get("FLOWPROBE_BENCH_THREADS", "2"))
MEMORY_MEASURES = {"tensor_peak_bytes": "peak tensor memory", "rss_peak_bytes": "peak-RSS increase"}


# -- problems: the library's U1 energy and two-moons data, shared by every library's row --
# U1 (Rezende & Mohamed 2015, ring with two modes), target ∝ exp(−U1); ``U1.energy`` is the unvalidated
# formula, a plain function of a ``(N, 2)`` tensor that every library's samples go through.
U1 = rezende_energy("U1")


def two_moons(n: int) -> torch.Tensor:
    """``n`` points of flowprobe's ``moons`` toy set (seed 0) in float32, the benchmark's dtype."""
    return load_data("moons", n, seed=0).float()


# -- adapters: one small class per library, same four operations --
class Model:
    """A library's flow seen through the operations the benchmark times."""

    def parameters(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def rsample_log_q(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparametrised samples and their log-density (forward direction)."""
        raise NotImplementedError

    def sample(self, n: int) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_logdet(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def canonical_weights(modules: list, seed: int = 0) -> list:
    """Raw parameters drawn layer by layer, by name, from N(0, 0.5²) with one generator, in place.

    Layers of one version of flowprobe and stacks of another get the very same values, so that a
    side-by-side comparison of two checkouts times the same flow (a no-grad inverse's cost depends
    on the weights: fixed Newton budgets or the safeguarded fallback, denormals in saturated tanh).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            params = sorted(module.named_parameters(recurse=False))
            depth = getattr(module, "depth", None)
            for k in range(depth or 1):
                for _, p in params:
                    target = p[k] if depth else p
                    target.copy_(0.5 * torch.randn(target.shape, generator=gen, dtype=p.dtype))
    return modules


class FlowprobeModel(Model):
    def __init__(self, layers: list, dim: int) -> None:
        self.flow = fp.Flow(fp.StandardNormal(dim), layers)

    def parameters(self):
        return list(self.flow.parameters())

    def rsample_log_q(self, n):
        return self.flow.rsample_and_log_prob(n)

    def sample(self, n):
        return self.flow.sample(n)

    def log_prob(self, x):
        return self.flow.log_prob(x)

    def forward_logdet(self, z):
        return self.flow(z)

    def to(self, dtype):
        self.flow.to(dtype)
        return self


class CompiledFlowprobeModel(FlowprobeModel):
    """flowprobe with ``rsample_and_log_prob`` compiled (``torch.compile``, inductor; the backward is
    AOTAutograd's compiled one): the reverse-KL rows (a) with ``--compiled``."""

    def __init__(self, layers: list, dim: int) -> None:
        super().__init__(layers, dim)
        self.compiled = torch.compile(self.flow.rsample_and_log_prob)

    def rsample_log_q(self, n):
        return self.compiled(n)


class NormflowsModel(Model):
    def __init__(self, layers: list, dim: int, invertible: bool) -> None:
        import normflows as nf

        self.flow = nf.NormalizingFlow(nf.distributions.DiagGaussian(dim, trainable=False), layers)
        self.invertible = invertible

    def parameters(self):
        return list(self.flow.parameters())

    def rsample_log_q(self, n):
        return self.flow.sample(n)

    def sample(self, n):
        with torch.no_grad():
            return self.flow.sample(n)[0]

    def log_prob(self, x):
        return self.flow.log_prob(x)

    def forward_logdet(self, z):
        return self.flow.forward_and_log_det(z)

    def to(self, dtype):
        self.flow.to(dtype)
        return self


class PyroModel(Model):
    def __init__(self, transforms: list, dim: int) -> None:
        import pyro.distributions as dist

        self.modules = torch.nn.ModuleList(transforms)
        self.dim = dim
        self.transforms = transforms
        self._dist = dist
        self._build(torch.float32)

    def _build(self, dtype):
        base = self._dist.Normal(torch.zeros(self.dim, dtype=dtype), torch.ones(self.dim, dtype=dtype)).to_event(1)
        self.dist = self._dist.TransformedDistribution(base, self.transforms)

    def parameters(self):
        return list(self.modules.parameters())

    def rsample_log_q(self, n):
        x = self.dist.rsample((n,))
        return x, self.dist.log_prob(x)

    def sample(self, n):
        with torch.no_grad():
            return self.dist.sample((n,))

    def log_prob(self, x):
        return self.dist.log_prob(x)

    def forward_logdet(self, z):
        logdet = z.new_zeros(z.shape[0])
        for t in self.transforms:
            x = t(z)
            logdet = logdet + t.log_abs_det_jacobian(z, x)
            z = x
        return z, logdet

    def to(self, dtype):
        self.modules.to(dtype)
        self._build(dtype)
        return self


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def build(lib: str, family: str, k: int, d: int) -> Model | str:
    """The flow of ``k`` layers of ``family`` in library ``lib``, or why it cannot be built."""
    if lib not in ("flowprobe", COMPILED) and not installed(lib):
        return "not installed"
    refl = d // 2 + 1  # Pyro's default count of reflections (used for every library alike)
    if lib in ("flowprobe", COMPILED):
        stack = {
            "planar-tanh": lambda: fp.Planar(d, "tanh", layers=k),
            "planar-leaky_relu": lambda: fp.Planar(d, "leaky_relu", layers=k),
            "radial": lambda: fp.Radial(d, layers=k),
            "sylvester-O": lambda: fp.Sylvester(d, kind="orthogonal", layers=k),
            "sylvester-H": lambda: fp.Sylvester(d, kind="householder", reflections=refl, layers=k),
            "sylvester-T": lambda: fp.Sylvester(d, kind="triangular", layers=k),  # alternating flips
            "householder": lambda: fp.Householder(d, reflections=refl, layers=k),
        }[family]
        return (CompiledFlowprobeModel if lib == COMPILED else FlowprobeModel)(canonical_weights([stack()]), d)
    if lib == "normflows":
        import normflows as nf

        make = {
            "planar-tanh": lambda: nf.flows.Planar((d,), act="tanh"),
            "planar-leaky_relu": lambda: nf.flows.Planar((d,), act="leaky_relu"),
            "radial": lambda: nf.flows.Radial((d,)),
        }.get(family)
        if make is None:
            return "cannot"
        return NormflowsModel([make() for _ in range(k)], d, invertible=family == "planar-leaky_relu")
    import pyro.distributions.transforms as pyro_t

    make = {
        "planar-tanh": lambda: pyro_t.Planar(d),
        "radial": lambda: pyro_t.Radial(d),
        "sylvester-H": lambda: pyro_t.Sylvester(d, count_transforms=refl),
        "householder": lambda: pyro_t.Householder(d, count_transforms=refl),
    }.get(family)
    if make is None:
        return "cannot"
    return PyroModel([make() for _ in range(k)], d)


def can_log_prob(lib: str, family: str) -> bool:
    """Whether ``lib`` evaluates ``log_prob`` at arbitrary data for ``family`` (needs an inverse)."""
    if lib == "flowprobe":
        return True
    if lib == "normflows":
        return family == "planar-leaky_relu"
    return family == "householder"


# -- the timed operations --
def rkl_step(model: Model, opt: torch.optim.Optimizer, n: int) -> Callable[[], None]:
    def step():
        x, log_q = model.rsample_log_q(n)
        loss = (log_q + U1.energy(x)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def ml_step(model: Model, opt: torch.optim.Optimizer, data: torch.Tensor, n: int) -> Callable[[], None]:
    gen = torch.Generator(device=data.device).manual_seed(1)

    def step():
        batch = data[torch.randint(0, data.shape[0], (n,), generator=gen, device=data.device)]
        loss = -model.log_prob(batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


@dataclass
class Row:
    key: str
    description: str
    unit: str  # "steps/s" or "points/s"
    per_call: int  # units per call (1 step or n points)
    family: str
    k: int
    d: int
    ldj_family: bool = True  # report the log-det error of this family

    def prepare(self, lib: str) -> Callable[[], None] | str:
        model = build(lib, self.family, self.k, self.d)
        if isinstance(model, str):
            return model
        kind = self.key.split(":")[1]
        if kind in ("ml", "log_prob") and not can_log_prob(lib, self.family):
            return "cannot"
        if kind == "rkl":
            return rkl_step(model, torch.optim.Adam(model.parameters(), lr=LR), self.per_call_n)
        if kind == "ml":  # an explicit loop, not flowprobe.fit: every library runs the same steps
            data = two_moons(20_000).to(torch.get_default_device())
            return ml_step(model, torch.optim.Adam(model.parameters(), lr=LR), data, self.per_call_n)
        if kind == "log_prob":
            x = sample_data(model, self.per_call_n)

            def log_prob():
                with torch.no_grad():
                    model.log_prob(x.view_as(x))  # a new tensor object: defeats Pyro's cache of its own samples

            return log_prob
        if kind == "sample":
            return lambda: model.sample(self.per_call_n)
        if kind == "sample_log_prob":

            def sample_log_prob():
                with torch.no_grad():
                    model.rsample_log_q(self.per_call_n)

            return sample_log_prob
        raise ValueError(kind)

    @property
    def per_call_n(self) -> int:
        return BATCH_TRAIN if self.unit == "steps/s" else BATCH_EVAL


def sample_data(model: Model, n: int) -> torch.Tensor:
    """Points to score: the model's own samples (so every library sees typical data)."""
    with torch.no_grad():
        return model.rsample_log_q(n)[0].detach()


def rows() -> list[Row]:
    out = [
        Row("a1:rkl", "(a) reverse-KL on U1, planar-tanh K=32 d=2", "steps/s", 1, "planar-tanh", 32, 2),
        Row("a2:rkl", "(a) reverse-KL on U1, radial K=32 d=2", "steps/s", 1, "radial", 32, 2),
        Row("b1:ml", "(b) max-likelihood two-moons, planar-tanh K=32 d=2", "steps/s", 1, "planar-tanh", 32, 2),
        Row("b2:ml", "(b) max-likelihood two-moons, planar-leaky_relu K=32", "steps/s", 1, "planar-leaky_relu", 32, 2),
        Row("b3:ml", "(b) max-likelihood two-moons, radial K=32 d=2", "steps/s", 1, "radial", 32, 2),
    ]
    for d in (2, 64):
        for family in ("planar-tanh", "radial"):
            kinds = (("log_prob", "log_prob"), ("sample", "sample"), ("sample_log_prob", "sample + log-density"))
            for kind, what in kinds:
                out.append(Row(f"c-{family}-{d}:{kind}", f"(c) {what}, {family} K=16 d={d}", "points/s", BATCH_EVAL,
                               family, 16, d))
    for family in ("sylvester-O", "sylvester-H", "sylvester-T", "householder"):
        out += [
            Row(f"d-{family}:sample_log_prob", f"(d) sample + log-density, {family} K=16 d=64", "points/s",
                BATCH_EVAL, family, 16, 64),
            Row(f"d-{family}:log_prob", f"(d) log_prob, {family} K=16 d=64", "points/s", BATCH_EVAL, family, 16, 64),
        ]
    return out


def _sync() -> None:
    """Wait for queued GPU work (timings on CUDA measure the work, not its launch)."""
    if torch.get_default_device().type == "cuda":
        torch.cuda.synchronize()


def time_rows(
    selected: list[Row], reps: int, target_s: float, compiled: bool = False
) -> dict[str, dict[str, float | str]]:
    """Median units/s per row and library; libraries alternate inside every repetition (with ``compiled``,
    the rows (a) also time :data:`COMPILED`; its first call, the compilation, is the warm-up)."""
    results: dict[str, dict[str, float | str]] = {}
    for row in selected:
        torch.manual_seed(0)
        libraries = (*LIBRARIES, COMPILED) if compiled and row.key.endswith(":rkl") else LIBRARIES
        fns = {lib: row.prepare(lib) for lib in libraries}
        calls: dict[str, int] = {}
        for lib, fn in fns.items():  # warm-up, then calibrate the calls per repetition
            if isinstance(fn, str):
                continue
            fn()
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            one = max(time.perf_counter() - start, 1e-6)
            calls[lib] = max(1, int(target_s / one))
        samples: dict[str, list[float]] = {lib: [] for lib in calls}
        for _ in range(reps):
            for lib in calls:
                fn = fns[lib]
                start = time.perf_counter()
                for _ in range(calls[lib]):
                    fn()  # type: ignore[operator]
                _sync()
                samples[lib].append(calls[lib] * row.per_call / (time.perf_counter() - start))
        results[row.key] = {
            lib: statistics.median(samples[lib]) if lib in samples else fns[lib]  # type: ignore[misc]
            for lib in libraries
        }
        print(f"  {row.key}: " + ", ".join(f"{lib}={_fmt(v)}" for lib, v in results[row.key].items()), flush=True)
    return results


def logdet_errors(families: list[tuple[str, int]], n: int = 8) -> dict[str, dict[str, float | str]]:
    """Max |log-det − log|det J|| over ``n`` points, J by autograd, float64, K = 4 layers."""
    out: dict[str, dict[str, float | str]] = {}
    for family, d in families:
        key = f"{family}-{d}"
        out[key] = {}
        for lib in LIBRARIES:
            torch.manual_seed(0)
            model = build(lib, family, 4, d)
            if isinstance(model, str):
                out[key][lib] = model
                continue
            model.to(torch.float64)
            z = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
            x, logdet = model.forward_logdet(z)
            rows_ = [torch.autograd.grad(x[:, i].sum(), z, retain_graph=True)[0] for i in range(d)]
            jac = torch.stack(rows_, 1)  # (n, d_out, d_in)
            exact = torch.linalg.slogdet(jac).logabsdet
            out[key][lib] = float((logdet.detach() - exact).abs().max())
    return out


# -- (e) peak memory: a fresh subprocess per measurement --
def _peak_tensor_bytes(step: Callable[[], None]) -> int:
    """Peak of live tensor bytes allocated during ``step`` above those live before it.

    Every allocation and free of torch's CPU allocator is recorded by the profiler
    (``profile_memory=True``); the running sum of these events in time order is the memory held by
    tensors, including autograd's saved tensors and transients inside every op — what
    ``torch.cuda.max_memory_allocated`` measures on a GPU.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def memory_child(lib: str, family: str, k: int, n: int, measure: str) -> None:
    """Print one measure of one training step's memory, after two warm-up steps at batch 1.

    ``tensor_peak_bytes``: :func:`_peak_tensor_bytes` of the step (the headline measure).
    ``rss_peak_bytes``: :func:`_peak_rss_increase` of the step; page granular and shaped by the
    allocator (memory reused from earlier frees is invisible, one large fresh buffer is not), so it
    is reported for completeness.
    """
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = build(lib, family, k, 2)
    assert not isinstance(model, str)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    warm_up = rkl_step(model, opt, 1)  # imports, autograd threads, optimizer state; batch 1 so that
    warm_up()  # the measured step's memory at batch n is not already held by the process
    warm_up()
    opt.zero_grad(set_to_none=True)
    step = rkl_step(model, opt, n)
    if measure == "tensor_peak_bytes":
        value = _peak_tensor_bytes(step)
    else:
        value = _peak_rss_increase(step)
    print(json.dumps({measure: value}))


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (Linux)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def _peak_rss_increase(step: Callable[[], None]) -> int:
    """Peak resident set during ``step`` minus the resident set before it, in bytes.

    Uses the process's own high-water mark ``VmHWM``, reset just before the step (``clear_refs``
    5, Linux ≥ 4.0); ``getrusage``'s ``ru_maxrss`` would not do: Linux carries it across ``exec``, so
    a child started by a large benchmark process would inherit the parent's peak.
    """
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    step()
    return (_status_kib("VmHWM") - before) * 1024


def memory(family: str, k: int, n: int) -> dict[str, dict[str, float] | str]:
    out: dict[str, dict[str, float] | str] = {}
    for lib in LIBRARIES:
        model = build(lib, family, 1, 2)
        if isinstance(model, str):
            out[lib] = model
            continue
        out[lib] = {}
        for measure in MEMORY_MEASURES:
            runs = []
            for _ in range(3):
                proc = subprocess.run(
                    [sys.executable, __file__, "--memory-child", lib, family, str(k), str(n), measure],
                    capture_output=True,
                    text=True,
                    check=True,
                    env=os.environ,
                )
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1])[measure])
            out[lib][measure] = statistics.median(runs)
    return out


# -- report --
def _fmt(v: float | str) -> str:
    if isinstance(v, str):
        return v
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.0f}k"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def ratio(values: dict[str, float | str], higher_is_better: bool = True, lib: str = "flowprobe") -> str:
    """``lib`` against the fastest (or leanest) anchor."""
    others = [v for name, v in values.items() if name in ("normflows", "pyro") and not isinstance(v, str)]
    ours = values.get(lib)
    if isinstance(ours, str) or not others:
        return "–"
    best = max(others) if higher_is_better else min(others)
    if ours <= 0 or best <= 0:
        return "–"
    r = ours / best if higher_is_better else best / ours
    return f"{r:.2f}×"


def markdown(result: dict) -> str:
    lines = [
        "| row | unit | flowprobe | normflows | Pyro | flowprobe / fastest other |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows():
        if row.key not in result["speed"]:
            continue
        v = result["speed"][row.key]
        cells = " | ".join(_fmt(v[lib]) for lib in LIBRARIES)
        lines.append(f"| {row.description} | {row.unit} | {cells} | {ratio(v)} |")
        if COMPILED in v:
            lines.append(f"| {row.description}, flowprobe under torch.compile | {row.unit} | {_fmt(v[COMPILED])} | "
                         f"{_fmt(v['normflows'])} | {_fmt(v['pyro'])} | {ratio(v, lib=COMPILED)} |")
    for key, v in result.get("memory", {}).items():
        for measure, what in MEMORY_MEASURES.items():
            values = {lib: v[lib] if isinstance(v[lib], str) else v[lib][measure] for lib in LIBRARIES}
            cells = " | ".join(x if isinstance(x, str) else f"{x / 2**20:.2f}" for x in values.values())
            lines.append(f"| (e) {what} of a training step, {key} | MiB (lower is better) | {cells} | "
                         f"{ratio(values, higher_is_better=False)} less |")
    lines += ["", "| log-det error vs autograd (float64, K=4, max over 8 points) | flowprobe | normflows | Pyro |",
              "|---|---|---|---|"]
    for key, v in result["logdet_error"].items():
        cells = " | ".join(v[lib] if isinstance(v[lib], str) else f"{v[lib]:.1e}" for lib in LIBRARIES)
        lines.append(f"| {key} | {cells} |")
    return "\n".join(lines)


def machine() -> dict[str, object]:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": THREADS,
        "load_average_at_start": load,
        "device": torch.cuda.get_device_name() if torch.get_default_device().type == "cuda" else "cpu",
        "versions": {lib: _version(lib) for lib in ("normflows", "pyro")},
    }


def _version(name: str) -> str:
    if not installed(name):
        return "not installed"
    return getattr(__import__(name), "__version__", "?")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions per row (median reported)")
    parser.add_argument("--target", type=float, default=0.25, help="seconds per repetition and library")
    parser.add_argument("--rows", default="", help="comma-separated row-key prefixes to run (default: all)")
    parser.add_argument("--no-memory", action="store_true", help="skip (e)")
    parser.add_argument("--compiled", action="store_true", help="rows (a) also with flowprobe under torch.compile")
    parser.add_argument("--quick", action="store_true", help="3 repetitions of 0.1 s (smoke run)")
    parser.add_argument("--json", default="", help="write the results here (atomically)")
    parser.add_argument("--device", default="cpu", help="where every library runs (cuda: see benchmarks/gpu_check.sh)")
    parser.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        lib, family, k, n, measure = args.memory_child
        memory_child(lib, family, int(k), int(n), measure)
        return {}
    torch.set_num_threads(THREADS)
    if args.device != "cpu":  # a default-device mode intercepts every torch call: only where needed
        torch.set_default_device(args.device)
    if args.quick:
        args.reps, args.target = 3, 0.1
    prefixes = [p for p in args.rows.split(",") if p]
    selected = [r for r in rows() if not prefixes or any(r.key.startswith(p) for p in prefixes)]
    result: dict = {"machine": machine()}
    print(f"timing {len(selected)} rows, {args.reps} repetitions of ~{args.target:g} s each", flush=True)
    result["speed"] = time_rows(selected, args.reps, args.target, args.compiled)
    if not args.no_memory and args.device == "cpu":
        result["memory"] = {f"planar-tanh K={k}, batch {BATCH_TRAIN}": memory("planar-tanh", k, BATCH_TRAIN)
                            for k in (32, 300)}
    families = [("planar-tanh", 2), ("radial", 2), ("planar-tanh", 64), ("radial", 64), ("sylvester-O", 64),
                ("sylvester-H", 64), ("sylvester-T", 64), ("householder", 64)]
    timed = {(row.family, row.d) for row in selected}
    result["logdet_error"] = logdet_errors([f for f in families if f in timed])
    result["markdown"] = markdown(result)
    print(result["markdown"])
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=2)
        os.replace(tmp, args.json)
    return result


if __name__ == "__main__":
    main()
