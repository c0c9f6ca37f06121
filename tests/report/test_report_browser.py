"""The report page in a real headless browser (Debian's chromium, which .ci/run installs): every section
present, every figure decoded and displayed with non-zero size, no console error, no horizontal
scrolling on a laptop-sized window; and the same probe catches a broken figure and a console error."""

import os
import struct

import pytest
from browser import Browser, find_chromium

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and (not os.environ.get("CI") or bool(os.environ.get("FLOWPROBE_BROWSER_UNAVAILABLE"))),
    reason="no chromium on PATH (.ci/run installs it; CI requires it unless it could not be installed)")
WIDTH = 1280  # a laptop screen

PROBE = """(async () => {
  const images = [...document.images];
  const decoded = await Promise.all(images.map(i => i.decode().then(() => true, () => false)));
  const box = e => e.getBoundingClientRect();
  return {
    sections: [...document.querySelectorAll('section.sec')].map(s => ({
      id: s.id, status: s.dataset.status, height: box(s).height,
      title: s.querySelector('h2').textContent, badge: s.querySelector('.badge').textContent})),
    images: images.map((i, k) => ({
      file: i.dataset.file, decoded: decoded[k], naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
      width: box(i).width, height: box(i).height,
      shown: getComputedStyle(i).display !== 'none' && getComputedStyle(i).visibility === 'visible'})),
    summaryRows: document.querySelectorAll('#summary tr').length - 1,
    scrollWidth: document.documentElement.scrollWidth,
  };
})()"""


def _png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM, "chromium is required in CI (.ci/run installs it)"
    with Browser(CHROMIUM, width=WIDTH) as b:
        yield b


def test_page_in_a_real_browser(tiny_report, browser):
    out, results = tiny_report
    browser.open((out / "index.html").resolve().as_uri())
    page = browser.evaluate(PROBE)
    assert browser.errors == []
    assert [(s["id"], s["status"]) for s in page["sections"]] == [(s["key"], s["status"]) for s in results["sections"]]
    assert all(s["height"] > 0 and s["title"].startswith(f"{i + 1}. ") for i, s in enumerate(page["sections"]))
    assert page["summaryRows"] == len(results["sections"])
    files = [f["file"] for s in results["sections"] for f in s.get("figures", [])]
    assert [i["file"] for i in page["images"]] == files and len(files) >= 10
    for image in page["images"]:
        width, height = _png_size((out / image["file"]).read_bytes())
        assert image["decoded"] and image["shown"], image
        assert (image["naturalWidth"], image["naturalHeight"]) == (width, height), image
        assert image["width"] > 0 and image["height"] > 0, image
    assert page["scrollWidth"] <= WIDTH  # wide tables scroll inside their box, not the page


def test_the_probe_sees_broken_figures_and_errors(tiny_report, browser, tmp_path):
    out, _ = tiny_report
    html = (out / "index.html").read_text()
    start = html.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken = html[:start] + "AAAA" + html[start + 4:]  # the first figure's PNG signature destroyed
    broken = broken.replace("</body>", "<script>console.error('injected'); null.x;</script></body>")
    (tmp_path / "broken.html").write_text(broken)
    browser.errors.clear()
    browser.open((tmp_path / "broken.html").as_uri())
    page = browser.evaluate(PROBE)
    assert [i["decoded"] for i in page["images"]][:2] == [False, True] and page["images"][0]["naturalWidth"] == 0
    assert any("injected" in e for e in browser.errors) and any("exception" in e for e in browser.errors)
