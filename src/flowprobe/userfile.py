"""Objects from the user's own Python files, named as ``path/to/file.py:name``.

Such a file is imported — executed — on purpose: it is code the user wrote and names on the
command line or in Python (an energy, a 1-D target, a density or a flow). Data, weights and
configs are never loaded this way (safetensors, JSON / YAML ``safe_load``).
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

__all__ = ["load_user_object", "load_user_value"]


def load_user_object(spec: str) -> object:
    """The attribute ``name`` of the module ``path/to/file.py`` for ``spec = "path/to/file.py:name"``.

    Raises:
        ValueError: a malformed spec, a file that fails to import, or a missing name (one line each).
        FileNotFoundError: the file does not exist.
    """
    path_text, _, name = spec.rpartition(":")
    if not path_text.endswith(".py") or not name:
        raise ValueError(f"expected path/to/file.py:name, got {spec!r}")
    path = Path(path_text)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"flowprobe_user_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
    try:
        module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as err:  # the user's file failed: one line, no traceback
        raise ValueError(f"{path} failed to import: {type(err).__name__}: {err}") from None
    if not hasattr(module, name):
        raise ValueError(f"{path} has no attribute {name!r}")
    return getattr(module, name)


def load_user_value(spec: str, what: str = "an object") -> object:
    """The object ``spec`` names (:func:`load_user_object`), called first if it is a plain function: a
    factory without required arguments that returns ``what``.

    Raises:
        ValueError: as :func:`load_user_object`; a function with required arguments; a factory that fails.
        FileNotFoundError: the file does not exist.
    """
    obj = load_user_object(spec)
    if not inspect.isfunction(obj):
        return obj
    if any(p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
           for p in inspect.signature(obj).parameters.values()):
        raise ValueError(f"{spec} is a function with required arguments; expected {what} or a function without "
                         "arguments that returns one")
    try:
        return obj()
    except Exception as err:  # the user's function failed: one line, no traceback
        raise ValueError(f"{spec} failed: {type(err).__name__}: {err}") from None
