"""``report.html`` (issue 13, DESIGN §7): one self-contained file beside ``report.md``, its text escaped, and
loaded in headless Chromium, where every table and every image must render."""
import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from simstudy.cli import main
from simstudy.engine import FitFailure, Study
from simstudy.engine.report_html import write_report_html, write_reports
from study_texts import binomial_study

NASTY = '<script>alert("x")</script> & <b>bold</b>'
INSTALL = "apt-get update && apt-get install -y chromium"


def _generate(cond, rng):
    return rng.normal(0.0, 1.0, cond["n"])


def _fit(x, cond):
    if x[0] > 1.8:  # about 3.6% of replicates: failures with a message that must be escaped
        raise FitFailure(f"first draw {x[0]:.2f} too big: {NASTY}")
    m = float(x.mean())
    se = float(x.std(ddof=1) / np.sqrt(len(x)))
    return {"estimate": m, "se": se, "ci_low": m - 1.96 * se, "ci_high": m + 1.96 * se, "kl": m * m}


@pytest.fixture(scope="module")
def result():
    study = Study(design={"n": [10, 40], "g": ["x", NASTY]}, generate=_generate, analyse={"mean": _fit},
                  truth=lambda cond: {"estimate": 0.0}, replicates=40, seed=5, name="html <study>",
                  options={"description": f"A test study {NASTY}",
                           "rates": [{"metric": "kl", "x": "n", "theory_slope": -1.0}]})
    res = study.run(n_jobs=1, progress=False)
    assert (res.table["status"] != "ok").any()  # the failures section is exercised
    return res


class _Page(HTMLParser):
    """Tags, image sources and text of a page."""

    def __init__(self):
        super().__init__()
        self.tags, self.srcs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def written(result, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    figs = result.plot(out / "figures", formats="png,svg")
    md = write_reports(result, out, figures=figs)
    return out, figs, md


def test_report_html_is_written_beside_report_md_and_is_self_contained(written):
    out, figs, md = written
    html_path = out / "report.html"
    assert md == out / "report.md" and md.is_file() and html_path.is_file()
    page = _parse(html_path)
    raw = html_path.read_text(encoding="utf-8")
    assert "script" not in page.tags  # no script: NASTY shows as text
    assert len(page.srcs) == len(figs) >= 5 and all(s.startswith("data:image/png;base64,") for s in page.srcs)
    for src, (_, path) in zip(page.srcs, figs):
        assert base64.b64decode(src.split(",", 1)[1]) == path.read_bytes()
    assert not re.search(r'(src|href)="(?!data:|#)', raw)  # nothing outside the file
    text = "".join(page.text)
    for heading in ("Design", "Failures", "Performance", "Rates", "Figures", "Settings"):
        assert heading in text
    assert NASTY in text and NASTY not in raw  # the study's text arrives as text, escaped in the source
    assert "first draw" in text and "Simulation study: html <study>" in text
    assert page.tags.count("table") == 8  # design, failure counts, failures, estimate, kl, rate fits, points, settings


def test_svg_figures_are_embedded_as_svg_and_missing_ones_are_named(result, tmp_path):
    figs = result.plot(tmp_path / "figures", formats="svg")
    figs.append(("Gone", tmp_path / "figures" / "gone.png"))
    path = write_report_html(result, tmp_path, figures=figs)
    page = _parse(path)
    assert len(page.srcs) == len(figs) - 1 and all(s.startswith("data:image/svg+xml;base64,") for s in page.srcs)
    assert "Figure Gone: gone.png not found." in "".join(page.text)


def test_study_result_report_and_the_cli_write_report_html(result, tmp_path, capsys):
    assert result.report(tmp_path / "py") == tmp_path / "py" / "report.md"
    assert (tmp_path / "py" / "report.html").is_file()
    toml = tmp_path / "bin.toml"
    toml.write_text(_TOML, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["run", str(toml), "--out", str(out), "--no-progress", "--figure-format", "svg"]) == 0
    said = capsys.readouterr().out
    assert "report.html" in said and "figures: svg" in said
    assert (out / "report.html").is_file() and list((out / "figures").glob("*.svg"))
    assert not list((out / "figures").glob("*.png"))
    (out / "report.html").unlink()
    assert main(["report", str(out), "--figure-format", "png"]) == 0
    page = _parse(out / "report.html")
    assert page.srcs and all(s.startswith("data:image/png") for s in page.srcs)


_TOML = binomial_study(name="bin", replicates=20, seed=3)


# -- in a browser --------------------------------------------------------------------------------------------
_PROBE = """<script>window.addEventListener("load", function () {
  var imgs = Array.from(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; });
  var tables = Array.from(document.querySelectorAll("table"));
  var shown = tables.filter(function (t) { var r = t.getBoundingClientRect(); return r.width > 0 && r.height > 0
      && t.querySelectorAll("td").length > 0; });
  document.body.setAttribute("data-images", imgs.length);
  document.body.setAttribute("data-images-ok", ok.length);
  document.body.setAttribute("data-tables", tables.length);
  document.body.setAttribute("data-tables-shown", shown.length);
});</script>"""


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _rendered(browser: str, page: Path) -> dict:
    """Load ``page`` (with the probe script added before </body>) in headless Chromium; the probe's counts."""
    probe = page.with_name(page.stem + "_probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    body = re.search(r"<body([^>]*)>", done.stdout)
    assert body, f"chromium printed no DOM (exit {done.returncode}): {done.stderr[-500:]}"
    return {k: int(v) for k, v in re.findall(r'data-([a-z-]+)="(\d+)"', body.group(1))}


def test_report_html_renders_every_table_and_image_in_headless_chromium(written):
    browser = _chromium()
    if browser is None:
        pytest.skip(f"chromium is not installed; install it with: {INSTALL}")
    out, figs, _ = written
    seen = _rendered(browser, out / "report.html")
    assert seen == {"images": len(figs), "images-ok": len(figs), "tables": 8, "tables-shown": 8}, seen
    # the probe can fail: one damaged image is found
    page = (out / "report.html").read_text(encoding="utf-8")
    first = re.search(r'src="data:image/png;base64,([^"]{40})', page).group(1)
    broken = out / "broken.html"
    broken.write_text(page.replace(first, "A" * 40, 1), encoding="utf-8")
    seen = _rendered(browser, broken)
    assert seen["images"] == len(figs) and seen["images-ok"] == len(figs) - 1, seen
