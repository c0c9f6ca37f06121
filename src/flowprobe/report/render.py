"""The report as one self-contained HTML page: inline CSS, figures embedded as base64 PNG, no script,
no network.

Every number of ``results.json`` appears on the page in an element
``<span class="num" data-path="/sections/2/numbers/tv" data-value="0.000668">0.000668</span>``:
``data-path`` is its JSON Pointer in ``results.json``, ``data-value`` its exact value and the text
:func:`~flowprobe.report.core.fmt` of it, so the page can be checked against the file.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from typing import Any

from flowprobe.report.core import fmt

__all__ = ["STATUS_TEXT", "render_html"]

STATUS_TEXT = {
    "holds": "holds", "fails": "fails", "inconclusive": "inconclusive", "error": "failed to run",
    "unavailable": "not available", "not run": "not run", "pending": "pending",
}

CSS = """
:root { --fg: #1d232b; --muted: #5b6573; --line: #d9dee5; --bg: #ffffff; --soft: #f5f7fa; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 1.6rem; margin: 0 0 4px; }
h2 { font-size: 1.25rem; margin: 0; }
h3 { font-size: 1rem; margin: 18px 0 6px; }
h4 { font-size: .95rem; margin: 12px 0 4px; color: var(--muted); }
p { margin: 6px 0; }
.sub { color: var(--muted); margin-bottom: 18px; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: .9rem; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.time { white-space: nowrap; }
.scroll { overflow-x: auto; max-width: 100%; }
section.sec { border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px; margin: 22px 0; }
.head { display: flex; align-items: center; gap: 12px; flex-wrap: wrap; }
.claim { font-size: 1.02rem; margin: 10px 0; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 999px; font-weight: 600; font-size: .85rem;
         color: #fff; white-space: nowrap; }
.holds { background: #1f7a3a; } .fails { background: #b3261e; } .inconclusive { background: #a36100; }
.error { background: #6d1b16; } .unavailable, .not-run { background: #6b7280; } .pending { background: #2f5fa7; }
ul.checks { list-style: none; padding-left: 0; margin: 6px 0; }
ul.checks li { padding: 2px 0; }
.mark { display: inline-block; width: 1.4em; font-weight: 700; }
.pass { color: #1f7a3a; } .miss { color: #b3261e; } .weak { color: #a36100; }
.rule { color: var(--muted); font-size: .85rem; }
figure { margin: 12px 0; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: .88rem; margin-top: 4px; }
pre { background: var(--soft); padding: 10px; overflow-x: auto; font-size: .8rem; }
.note { color: var(--muted); font-size: .88rem; }
footer { margin-top: 36px; color: var(--muted); font-size: .85rem; }
"""

RULE = ("Verdicts are computed from the numbers: <b>holds</b> when every check passes, <b>fails</b> when a "
        "decisive check fails, <b>inconclusive</b> when only an evidence check (marked “evidence”) fails.")


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _label(key: str, labels: dict[str, str]) -> str:
    return labels.get(key, key.replace("_", " "))


def _badge(status: str) -> str:
    return f'<span class="badge {status.replace(" ", "-")}">{_e(STATUS_TEXT.get(status, status))}</span>'


def _scalar(value: Any, path: str) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return "–" if value is None else _e(fmt(value) if isinstance(value, bool) else value)
    return f'<span class="num" data-path="{_e(path)}" data-value="{value!r}">{_e(fmt(value))}</span>'


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, dict | list)


def _inline(value: Any, path: str, labels: dict[str, str]) -> str:
    """Any value on one line: lists as ``[a, b]``, dicts as ``key = value; …``."""
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v, f"{path}/{i}", labels) for i, v in enumerate(value)) + "]"
    if isinstance(value, dict):
        return "; ".join(f"{_e(_label(k, labels))} = {_inline(v, f'{path}/{k}', labels)}" for k, v in value.items())
    return _scalar(value, path)


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _records(rows: list[dict], path: str, labels: dict[str, str]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    numeric = {c for c in columns if all(_numeric(r.get(c)) or r.get(c) is None for r in rows)}
    head = "".join(f'<th class="{"n" if c in numeric else ""}">{_e(_label(c, labels))}</th>' for c in columns)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for c in columns:
            cls = ' class="n"' if c in numeric else ""
            cells.append(f"<td{cls}>{_inline(row[c], f'{path}/{i}/{c}', labels) if c in row else ''}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>'


def _tree(value: Any, path: str, labels: dict[str, str]) -> str:
    """Numbers as tables: a dict's scalars as one two-column table, lists of dicts as tables, the rest
    under their own headings."""
    if isinstance(value, list):
        if value and all(isinstance(v, dict) and all(_is_scalar(x) or isinstance(x, list | dict) for x in v.values())
                         for v in value):
            return _records(value, path, labels)
        return f"<p>{_inline(value, path, labels)}</p>"
    if not isinstance(value, dict):
        return f"<p>{_scalar(value, path)}</p>"
    parts = []
    flat = {k: v for k, v in value.items() if _is_scalar(v) or (isinstance(v, list) and all(map(_is_scalar, v)))}
    if flat:
        rows = "".join(f'<tr><th>{_e(_label(k, labels))}</th><td class="n">{_inline(v, f"{path}/{k}", labels)}'
                       "</td></tr>" for k, v in flat.items())
        parts.append(f'<div class="scroll"><table>{rows}</table></div>')
    for k, v in value.items():
        if k not in flat:
            parts.append(f"<h4>{_e(_label(k, labels))}</h4>{_tree(v, f'{path}/{k}', labels)}")
    return "".join(parts)


def _checks(criterion: list[dict]) -> str:
    items = []
    for c in criterion:
        mark, cls = ("✓", "pass") if c["passed"] else ("✗", "miss" if c["decisive"] else "weak")
        kind = "" if c["decisive"] else ' <span class="note">(evidence)</span>'
        items.append(f'<li><span class="mark {cls}">{mark}</span>{_e(c["text"])}{kind}</li>')
    return f'<ul class="checks">{"".join(items)}</ul><p class="rule">{RULE}</p>'


def _figures(record: dict, load: Callable[[str], bytes]) -> str:
    parts = []
    for figure in record.get("figures", []):
        data = base64.b64encode(load(figure["file"])).decode("ascii")
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{_e(figure["caption"])}" '
                     f'data-file="{_e(figure["file"])}"><figcaption>{_e(figure["caption"])} '
                     f'(<code>{_e(figure["file"])}</code>)</figcaption></figure>')
    return "".join(parts)


def _cpu(record: dict, path: str) -> str:
    """`` (n s CPU)`` when the record has its CPU time (records of older reports may not)."""
    cpu = record.get("cpu_seconds")
    return "" if cpu is None else f" ({_scalar(cpu, path + '/cpu_seconds')} s CPU)"


def _section(i: int, record: dict, load: Callable[[str], bytes]) -> str:
    path = f"/sections/{i}"
    status = record["status"]
    parts = [f'<section class="sec" id="{_e(record["key"])}" data-status="{_e(status)}">',
             f'<div class="head"><h2>{_scalar(record["number"], path + "/number")}. {_e(record["title"])}</h2>'
             f"{_badge(status)}</div>",
             f'<p class="claim"><b>Claim.</b> {_e(record["claim"])}</p>']
    if status in ("unavailable", "not run", "pending"):
        parts.append(f'<p class="note">{_e(record.get("reason", "waiting for its turn"))}</p>')
    elif status == "error":
        parts.append(f"<p><b>This section failed to run:</b> <code>{_e(record['error'])}</code></p>"
                     f"<details><summary>traceback</summary><pre>{_e(record['traceback'])}</pre></details>")
    else:
        labels = record.get("labels", {})
        parts += [f"<h3>What was measured</h3><p>{_e(record['measured'])}</p>",
                  f"<h3>Verdict: {_badge(status)}</h3>{_checks(record['criterion'])}",
                  f"<h3>Numbers</h3>{_tree(record['numbers'], path + '/numbers', labels)}",
                  _figures(record, load)]
    if "settings" in record:  # the section ran (a verdict or an error)
        cached = " (cached: an earlier run with the same settings and versions)" if record.get("cached") else ""
        parts.append(f'<p class="note">Settings: {_inline(record["settings"], path + "/settings", {})}; seed '
                     f"{_scalar(record['seed'], path + '/seed')}; {_scalar(record['seconds'], path + '/seconds')} s"
                     f"{_cpu(record, path)}"
                     f"{cached}.</p>")
    parts.append("</section>")
    return "".join(parts)


def _summary(results: dict) -> str:
    rows = []
    for i, record in enumerate(results["sections"]):
        seconds = record.get("seconds")
        time_cell = _scalar(seconds, f"/sections/{i}/seconds") + " s" + _cpu(record, f"/sections/{i}") \
            if seconds is not None else ""
        rows.append(f'<tr><td class="n">{_scalar(record["number"], f"/sections/{i}/number")}</td>'
                    f'<td><a href="#{_e(record["key"])}">{_e(record["title"])}</a></td><td>{_e(record["claim"])}</td>'
                    f'<td>{_badge(record["status"])}</td><td class="n time">{time_cell}</td></tr>')
    counts = ", ".join(f"{_scalar(n, f'/summary/{k}')} {_e(k)}" for k, n in results["summary"].items())
    return (f'<div class="scroll"><table id="summary"><tr><th class="n">#</th><th>Section</th><th>Claim</th>'
            f'<th>Verdict</th><th class="n">Time</th></tr>{"".join(rows)}</table></div><p>{counts}.</p>')


def _footer(results: dict) -> str:
    versions = ", ".join(f"{_e(k)} {_e(v)}" for k, v in results["versions"].items())
    wall = results.get("wall_seconds")
    wall_text = f"; this run took {_scalar(wall, '/wall_seconds')} s" if wall is not None else ""
    return (f"<footer><p>Produced by <code>{_e(results['command'])}</code> in {_e(results['mode'])} mode, seed "
            f"{_scalar(results['seed'], '/seed')}{wall_text}. Versions: {versions}; flowprobe source digest "
            f"<code>{_e(results['code_digest'][:16])}</code>. Every number on this page is in "
            f"<code>results.json</code> (format {_scalar(results['format'], '/format')}) with the settings and "
            "versions that produced it.</p></footer>")


def render_html(results: dict[str, Any], load: Callable[[str], bytes]) -> str:
    """The page of a report.

    Args:
        results: The content of ``results.json``.
        load: ``file name → bytes`` of a figure of the report.
    """
    title = "flowprobe reproduce: the expressive power of residual normalizing flows"
    state = "" if results.get("finished") else " — in progress"
    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="sub">Every claim of Kong &amp; Chaudhuri, <i>The Expressive Power of a Class of Normalizing '
            f"Flow Models</i> (AISTATS 2020), measured, with Rezende &amp; Mohamed's Figure 3. "
            f"Mode: <b>{_e(results['mode'])}</b>{state}.</p>",
            _summary(results),
            *(_section(i, record, load) for i, record in enumerate(results["sections"])),
            _footer(results)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>{''.join(body)}</main></body></html>\n")
