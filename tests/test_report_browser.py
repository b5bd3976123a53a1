"""The HTML report in a real browser (issue 23): headless Chromium at 1,280 px renders the page
of a real cache's report and of a deliberately wide one; the page must not scroll sideways
(wide tables scroll inside their own box), every figure must load, and the leaderboard must
sort on a header click. A screenshot of each is saved under the test's temp folder.

Skips where no ``chromium`` / ``chromium-browser`` is installed (Debian: ``apt-get install
chromium``; ``.ci/run`` installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_report import LONG, real_cache, rec

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium or chromium-browser on PATH: "
                                "`apt-get install chromium` (Debian) runs the browser test")
WIDTH = 1280

# After the page loads: its width, the images that decoded, then a click on the leaderboard's
# "backbone" header and the order it leaves; written into the DOM for --dump-dom to carry out.
CHECK = """<script>window.addEventListener('load',function(){
 var imgs=Array.from(document.images),t=document.querySelector('table.sortable');
 var names=function(){return Array.from(t.tBodies[0].rows).map(function(r){return r.cells[2].textContent;});};
 var r={scrollWidth:document.documentElement.scrollWidth,images:imgs.length,
  loaded:imgs.filter(function(i){return i.complete&&i.naturalWidth>0;}).length,before:names()};
 t.tHead.rows[0].cells[2].click();r.after=names();
 var p=document.createElement('pre');p.id='bb-check';p.textContent=JSON.stringify(r);document.body.appendChild(p);});
</script>"""


def chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--disable-gpu", "--no-sandbox", f"--window-size={WIDTH},900",
                           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=180)


def check_in_browser(page: Path, tmp_path: Path) -> dict:
    """Screenshot ``page`` at 1,280 px, then load a copy with :data:`CHECK` and read its result."""
    shot = tmp_path / f"{page.stem}-{WIDTH}.png"
    done = chromium([f"--screenshot={shot}", page.as_uri()], tmp_path)
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", done.stderr[-2000:]
    probe = page.with_name(page.stem + "-check.html")
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    done = chromium(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], tmp_path)
    found = re.search(r'<pre id="bb-check">(.*?)</pre>', done.stdout)
    assert found, f"the check script left no result: {done.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


def assert_readable(result: dict, n_images: int) -> None:
    assert result["scrollWidth"] <= WIDTH, f"the page scrolls sideways at {WIDTH} px: {result['scrollWidth']} px"
    assert result["images"] == n_images and result["loaded"] == n_images, result
    assert result["after"] == sorted(result["before"]) or result["after"] == sorted(result["before"], reverse=True)


def test_a_real_caches_report_fits_1280_px_and_every_figure_loads(cache_path, run_cli, tmp_path):
    real_cache(cache_path)
    page = tmp_path / "report.html"
    code, _, err = run_cli("report", "--cache", cache_path, "--format", "html", "--bootstrap", "200", "-o", str(page))
    assert code == 0, err
    n_images = page.read_text().count("<img ")
    assert n_images >= 6  # aggregate, task scores, z heatmap, correlation, CD diagram, few-shot, cost
    result = check_in_browser(page, tmp_path)
    assert_readable(result, n_images)
    assert result["before"][0] == LONG


def test_a_wide_report_scrolls_its_tables_not_the_page(tmp_path):
    """Twelve columns and long names: the metric table is wider than the window, the page is not."""
    from backbench.report.leaderboard import build
    from backbench.report.render import figures, to_html

    names = [f"hf:facebook/dinov2-with-registers-giant-imagenet1k-{k}@main" for k in range(6)]
    recs = [rec(b, task, f"a-rather-long-dataset-name-{d}", 0.5 + 0.05 * k - 0.01 * d, metric)
            for k, b in enumerate(names) for task, metric in (("probe", "top1"), ("knn", "top1"), ("ood", "auroc"))
            for d in range(4)]
    lb = build(recs, bootstrap=50)
    page = tmp_path / "wide.html"
    figs = figures(lb, {b: {"n_params": 1e8 * (k + 1), "gflops": 10.0 * (k + 1)} for k, b in enumerate(names)})
    page.write_text(to_html(lb, figs))
    result = check_in_browser(page, tmp_path)
    assert_readable(result, len(figs))
