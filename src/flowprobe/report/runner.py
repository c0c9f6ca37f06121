"""Running a report: sections in this process or in parallel processes, cached results, one writer.

:func:`reproduce` writes ``DIR/index.html`` (:mod:`flowprobe.report.render`), ``DIR/results.json``
and one PNG per figure, through an :class:`~flowprobe.rundir.OutputDir` (one writer at a time,
atomic files, nothing replaced or deleted that flowprobe did not write). The page and
``results.json`` are rewritten after every section, so a killed run leaves the sections finished so
far, and the next run reuses them.

``results.json`` is also the cache: a section's record is reused when its *cache key* — a SHA-256 of
the section, its settings, the seed, the versions of flowprobe, Python, PyTorch, NumPy, SciPy and
matplotlib, and a digest of flowprobe's source files — is unchanged and its figures are intact.

Sections run where they cannot disturb each other: each gets its own seed and settings, returns its
numbers and figures as data (:class:`~flowprobe.report.core.SectionOutput`), and an exception in one
becomes that section's error record while the others still run. With ``jobs > 1`` they run in
``spawn``-ed worker processes sharing the CPU threads. ``FLOWPROBE_REPORT_FAIL=KEY[,KEY…]`` makes
the named sections raise (a test hook for the failure path).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from flowprobe.io import atomic_write, is_temporary, read_json, sha256_file, write_json
from flowprobe.report.core import MODES, VERDICTS, Context, Section, SectionOutput, verdict
from flowprobe.rundir import META, OutputDir

__all__ = [
    "FAIL_ENV",
    "REPORT_KIND",
    "cache_key",
    "code_digest",
    "exit_status",
    "override",
    "reproduce",
    "select",
    "versions",
]

REPORT_KIND = "flowprobe-report"
FORMAT = 1
FAIL_ENV = "FLOWPROBE_REPORT_FAIL"
SECTION_ERROR_BASE = 10
"""Exit status ``10 + n``: section ``n`` raised (the lowest-numbered one when several did)."""


# -- provenance ----------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Versions of flowprobe and of what its numbers depend on."""
    import matplotlib
    import numpy
    import scipy
    import torch

    import flowprobe

    return {"flowprobe": flowprobe.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "scipy": scipy.__version__, "matplotlib": matplotlib.__version__}


@functools.cache
def code_digest() -> str:
    """SHA-256 over flowprobe's source files (paths and contents): a changed line invalidates the cache."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_key(section: Section, mode: str, seed: int, provenance: dict[str, Any]) -> str:
    """The key under which a section's result is reused (module docstring)."""
    text = json.dumps({"section": section.key, "mode": mode, "settings": section.settings_for(mode), "seed": seed,
                       **provenance}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# -- one section ---------------------------------------------------------------------------------


def _progress_line(prefix: str, line: str) -> None:
    print(f"    {prefix}: {line}", file=sys.stderr, flush=True)


def execute(section: Section, mode: str, seed: int) -> dict[str, Any]:
    """Run one section and return its record (figures as PNG bytes); never raises.

    Records: ``status`` (a verdict, or ``error``), ``measured``, ``numbers``, ``criterion``,
    ``labels``, ``figures``, ``seconds`` (wall clock) and ``cpu_seconds`` (CPU time of this process, all
    threads: the measure that does not depend on what else the machine runs); an error record has
    ``error`` (one line) and ``traceback``.
    """
    start, cpu = time.perf_counter(), time.process_time()
    progress = functools.partial(_progress_line, f"({section.number}) {section.key}")
    try:
        if section.key in os.environ.get(FAIL_ENV, "").split(","):
            raise RuntimeError(f"failure injected through {FAIL_ENV}")
        assert section.run is not None
        output = section.run(Context(mode, section.settings_for(mode), seed, progress))
        if not isinstance(output, SectionOutput):
            raise TypeError(f"the section returned {type(output).__name__}, expected a SectionOutput")
        json.dumps(output.numbers, allow_nan=False)  # every number finite and JSON
        status = verdict(output.checks)
    except Exception as err:
        return {"status": "error", "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                "traceback": traceback.format_exc(), "seconds": time.perf_counter() - start,
                "cpu_seconds": time.process_time() - cpu}
    figures = [{"name": name, "png": png, "caption": caption} for name, (png, caption) in output.figures.items()]
    return {"status": status, "measured": output.measured, "numbers": output.numbers,
            "criterion": [c.to_dict() for c in output.checks], "labels": output.labels, "figures": figures,
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_sections(todo: Sequence[Section], mode: str, seed: int, jobs: int,
                  done: Callable[[Section, dict[str, Any]], None]) -> None:
    """Run ``todo``, calling ``done(section, record)`` as each finishes (in this process with one job)."""
    if jobs == 1 or len(todo) <= 1:
        for section in todo:
            done(section, execute(section, mode, seed))
        return
    import torch

    workers = min(jobs, len(todo))
    threads = max(1, torch.get_num_threads() // workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(threads,)) as pool:
        futures = {pool.submit(execute, section, mode, seed): section for section in todo}
        for future in as_completed(futures):
            try:
                record = future.result()
            except Exception as err:  # the worker process died (killed, out of memory)
                record = {"status": "error", "error": f"worker process failed: {type(err).__name__}: {err}",
                          "traceback": "", "seconds": 0.0}
            done(futures[future], record)


# -- the report directory ------------------------------------------------------------------------


def _manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = read_json(path / META / "manifest.json")
    except (FileNotFoundError, ValueError):
        return {}
    files = manifest.get("files") if isinstance(manifest, dict) else None
    return files if isinstance(files, dict) else {}


def check_out(path: Path) -> None:
    """Refuse an output directory that is not empty and not a previous report.

    Raises:
        NotADirectoryError: ``path`` is a file.
        ValueError: a directory with other contents.
    """
    if not path.exists():
        return
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, expected a directory")
    if "index.html" in _manifest(path):
        return
    if any(p.name != META and not is_temporary(p) for p in path.iterdir()):
        raise ValueError(f"{path} is not empty and holds no flowprobe report; choose a new or empty --out "
                         "(flowprobe never writes into a directory it did not create)")


def _previous(path: Path) -> dict[str, dict[str, Any]]:
    """The section records of the report in ``path`` (empty when there is none or it is unreadable)."""
    try:
        results = read_json(path / "results.json")
    except (FileNotFoundError, ValueError):
        return {}
    if not isinstance(results, dict) or results.get("kind") != REPORT_KIND:
        return {}
    return {s["key"]: s for s in results.get("sections", []) if isinstance(s, dict) and "key" in s}


def _intact(record: dict[str, Any], out: OutputDir) -> bool:
    """Whether every figure of a record is the file flowprobe wrote."""
    for figure in record.get("figures", []):
        name = figure.get("file", "")
        path = out.path / name
        if out.files.get(name) != figure.get("sha256") or not path.is_file() or sha256_file(path) != figure["sha256"]:
            return False
    return True


def override(sections: Sequence[Section], overrides: Mapping[str, Mapping[str, Any]]) -> list[Section]:
    """``sections`` with the settings of ``overrides`` (``key → {setting: value}``) replaced in every mode.

    Raises:
        ValueError: an unknown section or setting.
    """
    keys = {s.key for s in sections}
    for key, values in overrides.items():
        if key not in keys:
            raise ValueError(f"cannot override settings of unknown section {key!r}")
        section = next(s for s in sections if s.key == key)
        unknown = [name for name in values if any(name not in section.settings_for(m) for m in MODES)]
        if unknown:
            raise ValueError(f"section {key!r} has no setting {unknown[0]!r}")
    return [dataclasses.replace(s, settings={m: s.settings_for(m) | dict(overrides[s.key]) for m in MODES})
            if s.key in overrides else s for s in sections]


def select(sections: Sequence[Section], only: Sequence[str] | None) -> list[Section]:
    """The sections named in ``only`` (keys or numbers), all when ``None``.

    Raises:
        ValueError: an unknown name.
    """
    if not only:
        return list(sections)
    names = {s.key: s for s in sections} | {str(s.number): s for s in sections}
    unknown = [n for n in only if n not in names]
    if unknown:
        choices = ", ".join(f"{s.number}/{s.key}" for s in sections)
        raise ValueError(f"unknown section {unknown[0]!r}; expected one of {choices}")
    chosen = {names[n].key for n in only}
    return [s for s in sections if s.key in chosen]


class _Report:
    """The records of one report and how they are written."""

    def __init__(self, out: OutputDir, sections: Sequence[Section], header: dict[str, Any]) -> None:
        self.out = out
        self.sections = sorted(sections, key=lambda s: s.number)
        self.header = header
        self.records: dict[str, dict[str, Any]] = {}

    def base(self, section: Section, **fields: Any) -> dict[str, Any]:
        return {"key": section.key, "number": section.number, "title": section.title, "claim": section.claim,
                **fields}

    def record(self, section: Section, key: str, result: dict[str, Any]) -> dict[str, Any]:
        """Write a finished section's figures and keep its record."""
        figures = []
        for figure in result.pop("figures", []):
            name = f"{section.key}_{figure['name']}.png"
            png = figure["png"]
            atomic_write(self.out.claim(name), lambda tmp, data=png: Path(tmp).write_bytes(data))
            sha = hashlib.sha256(png).hexdigest()
            self.out.seal(name, sha)
            figures.append({"name": figure["name"], "file": name, "caption": figure["caption"], "sha256": sha})
        record = self.base(section, **result, figures=figures, settings=section.settings_for(self.header["mode"]),
                           cache_key=key, versions=self.header["versions"], code_digest=self.header["code_digest"],
                           seed=self.header["seed"], mode=self.header["mode"], cached=False)
        self.records[section.key] = record
        return record

    def results(self) -> dict[str, Any]:
        sections = [self.records.get(s.key) or self.base(s, status="pending") for s in self.sections]
        statuses = [s["status"] for s in sections]
        counts = {status: statuses.count(status) for status in (*VERDICTS, "error", "unavailable", "not run", "pending")
                  if status in statuses}
        return {**self.header, "summary": counts, "sections": sections}

    def write(self, finished: bool) -> dict[str, Any]:
        """Rewrite ``index.html`` and then ``results.json``; when ``finished``, delete figures no record uses."""
        from flowprobe.report.render import render_html

        results = self.results() | {"finished": finished}
        if finished:
            used = {f["file"] for s in results["sections"] for f in s.get("figures", [])}
            for name in [n for n in self.out.files if n.endswith(".png") and n not in used]:
                self.out.forget(name)
        html = render_html(results, lambda name: (self.out.path / name).read_bytes())
        atomic_write(self.out.claim("index.html"), lambda tmp: Path(tmp).write_text(html, encoding="utf-8"))
        self.out.seal("index.html", sha256_file(self.out.path / "index.html"))
        # results.json last: a section it shows is on the page too, even when the run is killed in between
        write_json(self.out.claim("results.json"), results)
        self.out.seal("results.json", sha256_file(self.out.path / "results.json"))
        return results


class _Progress:
    """One line on stderr per finished section: how many are done, the elapsed time, the verdict."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def started(self, sections: Sequence[Section], jobs: int) -> None:
        names = ", ".join(f"({s.number}) {s.key}" for s in sections)
        print(f"running {len(sections)} section(s) with {jobs} job(s): {names}", file=sys.stderr, flush=True)

    def finished(self, record: dict[str, Any]) -> None:
        self.done += 1
        status = record["status"] + (f" — {record['error']}" if record["status"] == "error" else "")
        elapsed = time.perf_counter() - self.start
        print(f"[{self.done}/{self.total}, {elapsed:.0f} s] ({record['number']}) {record['key']}: {status} "
              f"({record.get('seconds', 0.0):.1f} s, {record.get('cpu_seconds', 0.0):.1f} s CPU)",
              file=sys.stderr, flush=True)


def reproduce(
    out: str | Path,
    sections: Sequence[Section],
    mode: str = "quick",
    only: Sequence[str] | None = None,
    force: bool = False,
    jobs: int = 1,
    seed: int = 0,
    command: str = "flowprobe.report.reproduce",
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the sections into the report directory ``out`` and return ``results.json``'s content.

    Args:
        out: The report directory (new, empty, or a previous report).
        sections: The sections of the report (:data:`flowprobe.report.sections.SECTIONS`).
        mode: ``quick`` or ``full``.
        only: Run only these sections (keys or numbers); the others are shown from the cache when
            their settings match, else as "not run".
        force: Run the chosen sections even when a cached result matches.
        jobs: Sections run at once (in worker processes when more than one).
        seed: Seed of every section.
        command: What produced the report (shown on the page).
        overrides: ``section key → {setting: value}`` replacing settings in every mode (e.g. the VAE
            section's ``data``); they are part of the cache key like any setting.

    Raises:
        ValueError: a bad mode, job count, section name or override, or an ``out`` that is not a report.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    sections = override(sections, overrides or {})
    chosen = {s.key for s in select(sections, only)}
    path = Path(out)
    check_out(path)
    provenance = {"versions": versions(), "code_digest": code_digest()}
    start = time.perf_counter()
    with OutputDir(path, "reproduce") as directory:
        check_out(path)  # again, now that no other writer can change it
        previous = _previous(path) if "results.json" in directory.files else {}
        header = {"kind": REPORT_KIND, "format": FORMAT, "mode": mode, "seed": seed, "command": command,
                  **provenance}
        report = _Report(directory, sections, header)
        todo = []
        for section in report.sections:
            key = cache_key(section, mode, seed, provenance)
            old = previous.get(section.key)
            reusable = (old is not None and old.get("cache_key") == key and old.get("status") in VERDICTS
                        and _intact(old, directory))
            missing = section.unavailable()
            if missing:
                report.records[section.key] = report.base(section, status="unavailable", reason=missing)
            elif reusable and not (force and section.key in chosen):
                report.records[section.key] = old | {"cached": True}
            elif section.key in chosen:
                todo.append(section)
            else:
                report.records[section.key] = report.base(section, status="not run",
                                                          reason="not run with these settings (run without --only)")
        report.write(finished=False)
        progress = _Progress(len(todo))
        progress.started(todo, min(jobs, max(1, len(todo))))
        keys = {s.key: cache_key(s, mode, seed, provenance) for s in todo}

        def done(section: Section, result: dict[str, Any]) -> None:
            progress.finished(report.record(section, keys[section.key], result))
            report.write(finished=False)

        _run_sections(todo, mode, seed, jobs, done)
        report.header["wall_seconds"] = time.perf_counter() - start
        return report.write(finished=True)


def exit_status(results: dict[str, Any]) -> int:
    """0: every section that ran holds; 1: a verdict is ``fails`` or ``inconclusive``; ``10 + n``:
    section ``n`` raised (the lowest-numbered one)."""
    errors = sorted(s["number"] for s in results["sections"] if s["status"] == "error")
    if errors:
        return SECTION_ERROR_BASE + errors[0]
    return 1 if any(s["status"] in ("fails", "inconclusive") for s in results["sections"]) else 0
