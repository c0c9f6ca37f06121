"""Sources and targets of the depth experiments, named by strings (``flowprobe depth --source/--target``).

Specs, for points in ``R^d``:

* ``normal``: ``N(0, I_d)``;
* ``normal:mean=M:cov=C``: ``M`` a number (every coordinate) or a JSON list of ``d`` numbers; ``C`` a
  number (``C·I_d``), a JSON list of ``d`` variances or a JSON ``d × d`` matrix (either may be omitted);
* ``shift:R``: ``N(R e₁, I_d)`` (the bounded-planar construction);
* ``halves:A:B``: ``N(0, diag(A, …, A, B, …, B))`` with ``d/2`` of each (the Householder construction
  is ``halves:2:1 → halves:1:2``);
* ``path/to/file.py:name``: a ``torch.distributions.Distribution`` (vector events, or scalar events for
  ``d = 1``), an object with ``log_prob(x)`` and ``sample(n)``, or a function without arguments that
  returns one. The file is imported — executed — on purpose: the user named it. :func:`pin_spec`
  makes its path absolute and pins its SHA-256 (``/abs/file.py:name@sha256=…``), and :func:`load_side`
  refuses a pinned file whose contents changed, so every run of a sweep sees the same code.

Each side is wrapped as a :class:`SideDensity` (a flowprobe :class:`~flowprobe.Density`, so it can be a
flow's base and either side of a TV estimate) and, when it is a normal density, described by a
:class:`~flowprobe.theory.depth.GaussianForm` for the lower bounds of :mod:`flowprobe.theory.depth`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from flowprobe.distributions import Density, DiagonalNormal, StandardNormal
from flowprobe.theory.depth import GaussianForm
from flowprobe.userfile import load_user_value

__all__ = ["DTYPES", "MAX_DIM", "Pair", "SideDensity", "gaussian_form", "is_file_spec", "load_pair", "load_side",
           "pin_spec"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
MAX_DIM = 4096
_PIN = "@sha256="
_PROBE = 4


def is_file_spec(spec: str) -> bool:
    """Whether ``spec`` names an object in a Python file (``path/to/file.py:name``, pinned or not)."""
    return ".py:" in spec.split(_PIN)[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pin_spec(spec: str) -> str:
    """``spec`` with a file's path made absolute and its SHA-256 appended; built-in specs unchanged.

    Raises:
        ValueError: a malformed file spec.
        FileNotFoundError: the file does not exist.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a density spec must be a non-empty string, got {spec!r}")
    if not is_file_spec(spec) or _PIN in spec:
        return spec
    path_text, _, name = spec.rpartition(":")
    path = Path(path_text)
    if not name or not path_text.endswith(".py"):
        raise ValueError(f"expected path/to/file.py:name, got {spec!r}")
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    return f"{path.resolve()}:{name}{_PIN}{_sha256(path)}"


class SideDensity(Density):
    """One side of a pair as a flowprobe :class:`~flowprobe.Density`: points ``(N, d)`` in, ``(N,)`` out.

    Wraps a torch distribution (drawn with ``rsample((n,))`` where it can, else ``sample((n,))``) or an
    object with ``log_prob(x)`` and ``sample(n)``; every call's output shape is checked and a failure of
    the user's code is a one-line ``ValueError``. Samples keep the object's dtype and device.

    Args:
        obj: The distribution.
        dim: Dimension ``d`` of its points.
        name: The spec, for messages.
        like: A sample, whose dtype and device the module carries.
    """

    def __init__(self, obj: Any, dim: int, name: str, like: Tensor) -> None:
        super().__init__(dim, like.dtype)
        self.to(like.device)
        self.obj, self.name = obj, name
        self.torch = isinstance(obj, Distribution)
        self.scalar = self.torch and len(obj.event_shape) == 0

    def _call(self, what: str, fn: Any, *args: Any) -> Tensor:
        try:
            return fn(*args)
        except Exception as err:  # the user's code failed: one line, no traceback
            raise ValueError(f"{self.name}: {what} failed: {type(err).__name__}: {err}") from None

    def _log_prob(self, x: Tensor) -> Tensor:
        out = self._call("log_prob", self.obj.log_prob, x[:, 0] if self.scalar else x)
        if not isinstance(out, Tensor) or out.shape != x.shape[:1]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{self.name}: log_prob of {x.shape[0]} points must have shape ({x.shape[0]},), "
                             f"got {shape}")
        return out

    def _rsample(self, n: int) -> Tensor:
        if self.torch:
            draw = self.obj.rsample if self.obj.has_rsample else self.obj.sample
            out = self._call("sample", draw, (n,))
            out = out.unsqueeze(-1) if self.scalar and isinstance(out, Tensor) else out
        else:
            out = self._call("sample", self.obj.sample, n)
        if not isinstance(out, Tensor) or not out.is_floating_point() or out.shape != (n, self.dim):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{self.name}: sample({n}) must be a float tensor of shape ({n}, {self.dim}), got {shape}")
        return out


@dataclass(frozen=True)
class Pair:
    """A source ``q`` and a target ``p`` on ``R^d``.

    Attributes:
        source: ``q`` (the base of the flows).
        target: ``p``.
        source_form: ``q`` as a normal density, if it is one.
        target_form: ``p`` as a normal density, if it is one.
        source_spec: The spec ``q`` was built from.
        target_spec: The spec ``p`` was built from.
    """

    source: SideDensity
    target: SideDensity
    source_form: GaussianForm | None
    target_form: GaussianForm | None
    source_spec: str
    target_spec: str

    @property
    def dim(self) -> int:
        """The dimension ``d``."""
        return self.source.dim


# -- built-ins ----------------------------------------------------------------------------------


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {text!r}")
    return value


def _json_tensor(text: str, what: str, dtype: torch.dtype) -> Tensor:
    try:
        value = torch.tensor(json.loads(text), dtype=dtype)
    except (json.JSONDecodeError, TypeError, ValueError, RuntimeError):
        raise ValueError(f"{what} must be a number or a JSON list, got {text!r}") from None
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what} must be finite, got {text!r}")
    return value


def _covariance(value: Tensor, dim: int, spec: str) -> Tensor:
    if value.dim() == 0:
        value = value * torch.ones(dim, dtype=value.dtype)
    if value.dim() == 1:
        if value.shape != (dim,) or not bool((value > 0).all()):
            raise ValueError(f"{spec}: cov as a list needs {dim} positive variances, got {value.tolist()}")
        return torch.diag(value)
    if value.shape != (dim, dim) or not torch.equal(value, value.mT) or torch.linalg.cholesky_ex(value).info:
        raise ValueError(f"{spec}: cov must be a symmetric positive definite {dim} × {dim} matrix")
    return value


def _builtin(spec: str, dim: int, dtype: torch.dtype) -> GaussianForm:
    """The normal density a built-in spec names."""
    name, *options = spec.strip().split(":")
    zero = torch.zeros(dim, dtype=dtype)
    if name == "normal":
        mean, cov = zero, torch.eye(dim, dtype=dtype)
        seen = set()
        for option in options:
            key, sep, text = option.partition("=")
            if not sep or key not in ("mean", "cov") or key in seen:
                raise ValueError(f"{spec}: expected options mean=… and cov=… (once each), got {option!r}")
            seen.add(key)
            value = _json_tensor(text, f"{spec}: {key}", dtype)
            if key == "cov":
                cov = _covariance(value, dim, spec)
            elif value.dim() == 0 or value.shape == (dim,):
                mean = zero + value
            else:
                raise ValueError(f"{spec}: mean must be a number or a list of {dim} numbers")
        return GaussianForm(mean, cov)
    if name == "shift" and len(options) == 1:
        mean = zero.clone()
        mean[0] = _number(options[0], f"{spec}: the shift R")
        return GaussianForm(mean, torch.eye(dim, dtype=dtype))
    if name == "halves" and len(options) == 2:
        a, b = (_number(v, f"{spec}: a variance") for v in options)
        if min(a, b) <= 0 or dim % 2:
            raise ValueError(f"{spec}: needs positive variances and an even dimension, got d = {dim}")
        variances = torch.tensor([a] * (dim // 2) + [b] * (dim // 2), dtype=dtype)
        return GaussianForm(zero, torch.diag(variances))
    raise ValueError(f"unknown density {spec!r}; expected normal, normal:mean=…:cov=…, shift:R, halves:A:B or "
                     "path/to/file.py:name")


# -- files --------------------------------------------------------------------------------------


def _user_object(spec: str) -> Any:
    """The object a (pinned) file spec names, called first if it is a function without arguments."""
    text, _, digest = spec.partition(_PIN)
    path = Path(text.rpartition(":")[0])
    if digest and path.is_file() and _sha256(path) != digest:
        raise ValueError(f"{path} changed since the sweep was defined (SHA-256 differs); run the sweep again "
                         "from the command line")
    return load_user_value(text, "a distribution")


def gaussian_form(obj: Any) -> GaussianForm | None:
    """``obj`` as ``N(mean, cov)`` if it is a normal density flowprobe recognises, else ``None``.

    Recognised: ``torch.distributions.MultivariateNormal``, ``Independent(Normal, 1)``, ``Normal`` with
    scalar events (each without batch dimensions), flowprobe's ``StandardNormal`` and ``DiagonalNormal``.
    """
    if isinstance(obj, Distribution) and obj.batch_shape != ():
        return None
    if isinstance(obj, MultivariateNormal):
        return GaussianForm(obj.loc.detach(), obj.covariance_matrix.detach())
    if isinstance(obj, Independent) and isinstance(obj.base_dist, Normal) and obj.reinterpreted_batch_ndims == 1:
        return GaussianForm(obj.base_dist.loc.detach(), torch.diag(obj.base_dist.scale.detach() ** 2))
    if isinstance(obj, Normal):
        return GaussianForm(obj.loc.detach().reshape(1), (obj.scale.detach() ** 2).reshape(1, 1))
    if isinstance(obj, StandardNormal):
        eye = torch.eye(obj.dim, dtype=obj.anchor.dtype, device=obj.anchor.device)
        return GaussianForm(torch.zeros(obj.dim, dtype=eye.dtype, device=eye.device), eye)
    if isinstance(obj, DiagonalNormal):
        return GaussianForm(obj.loc.detach(), torch.diag(torch.exp(2 * obj.log_scale.detach())))
    return None


def load_side(
    spec: str, dim: int | None, dtype: torch.dtype = torch.float64
) -> tuple[SideDensity, GaussianForm | None]:
    """The density a spec names and its normal form (``None`` unless normal).

    Built-ins are built in ``dtype`` on the CPU; a user's object keeps its own dtype and device. It is
    checked on a few draws: ``sample(n)`` of shape ``(n, d)``, finite ``log_prob`` of shape ``(n,)``.

    Args:
        spec: See the module docstring.
        dim: ``d``; required for built-ins, checked against a user's object.
        dtype: Floating-point type of the built-ins.

    Raises:
        ValueError: an unknown or malformed spec, a dimension mismatch, a file that changed since it was
            pinned, or an object that does not behave as a density.
        FileNotFoundError: the file does not exist.
    """
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_DIM):
        raise ValueError(f"the dimension must be an integer in [1, {MAX_DIM}], got {dim!r}")
    if is_file_spec(spec):
        obj = _user_object(spec)
        name = spec.partition(_PIN)[0]
        if not (callable(getattr(obj, "log_prob", None)) and callable(getattr(obj, "sample", None))):
            raise ValueError(f"{name} must be a torch distribution or have log_prob(x) and sample(n), got "
                             f"{type(obj).__name__}")
        if isinstance(obj, Distribution) and (obj.batch_shape != () or len(obj.event_shape) > 1):
            raise ValueError(f"{name} must have no batch dimensions and vector (or scalar) events, got batch "
                             f"{tuple(obj.batch_shape)}, event {tuple(obj.event_shape)}")
        form = gaussian_form(obj)
    else:
        if dim is None:
            raise ValueError(f"{spec}: a built-in density needs the dimension d")
        form = _builtin(spec, dim, dtype)
        obj, name = MultivariateNormal(form.mean, form.cov), spec
    probe = _probe_sample(obj)
    side = SideDensity(obj, probe.shape[-1], name, probe)
    if dim is not None and side.dim != dim:
        raise ValueError(f"{name} draws points of dimension {side.dim}, expected {dim}")
    x = side.sample(_PROBE)
    if not bool(torch.isfinite(x).all()) or not bool(torch.isfinite(side.log_prob(x)).all()):
        raise ValueError(f"{name}: samples or their log_prob are not finite")
    return side, form


def _probe_sample(obj: Any) -> Tensor:
    """One draw as ``(1, d)``, to learn ``d``, the dtype and the device."""
    try:
        x = obj.sample((1,)) if isinstance(obj, Distribution) else obj.sample(1)
    except Exception as err:  # the user's code failed: one line, no traceback
        raise ValueError(f"sample failed: {type(err).__name__}: {err}") from None
    if isinstance(obj, Distribution) and len(obj.event_shape) == 0 and isinstance(x, Tensor):
        x = x.unsqueeze(-1)
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"sample(1) must be a float tensor of shape (1, d), got {getattr(x, 'shape', type(x))}")
    return x


def load_pair(source: str, target: str, dim: int | None, dtype: torch.dtype = torch.float64) -> Pair:
    """The pair ``(q, p)`` named by two specs (see :func:`load_side`).

    Raises:
        ValueError: as :func:`load_side`, or sides of different dimension, dtype or device.
    """
    q, q_form = load_side(source, dim, dtype)
    p, p_form = load_side(target, dim if dim is not None else q.dim, dtype)
    if (q.anchor.dtype, q.anchor.device) != (p.anchor.dtype, p.anchor.device):
        raise ValueError(f"source and target must share dtype and device, got {q.anchor.dtype} on {q.anchor.device} "
                         f"and {p.anchor.dtype} on {p.anchor.device}")
    return Pair(q, p, q_form, p_form, source, target)
