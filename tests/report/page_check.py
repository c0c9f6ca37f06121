"""The page against results.json: every number of the file is on the page, with its exact value and the
text it is shown as, and the page shows no number that the file lacks."""

import json
from html.parser import HTMLParser

from flowprobe.report.core import fmt

__all__ = ["check_page_against_results", "numeric_leaves"]


class _Numbers(HTMLParser):
    """``data-path → [(data-value, text)]`` of every number on a page, and the section ids."""

    def __init__(self):
        super().__init__()
        self.numbers, self.sections, self._open = {}, [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and attrs.get("class") == "num":
            self._open = (attrs["data-path"], attrs["data-value"])
        if tag == "section":
            self.sections.append((attrs["id"], attrs["data-status"]))

    def handle_data(self, data):
        if self._open is not None:
            self.numbers.setdefault(self._open[0], []).append((self._open[1], data))
            self._open = None


def numeric_leaves(value, path=""):
    """``(JSON Pointer, number)`` of every number (not bool) in a JSON tree."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from numeric_leaves(v, f"{path}/{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from numeric_leaves(v, f"{path}/{i}")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path, value


def check_page_against_results(out):
    """Every number of results.json is on the page, with its exact value and its displayed text."""
    results = json.loads((out / "results.json").read_text())
    page = _Numbers()
    page.feed((out / "index.html").read_text())
    leaves = list(numeric_leaves(results))
    assert leaves
    for pointer, value in leaves:
        assert pointer in page.numbers, f"{pointer} = {value} is not on the page"
        for shown, text in page.numbers[pointer]:
            assert float(shown) == value and text == fmt(value), (pointer, value, shown, text)
    assert set(page.numbers) == {p for p, _ in leaves}  # and nothing on the page that the file lacks
    return results, page
