"""The run report: pure rendering, and the real page in headless Chromium (CI installs Debian's chromium)."""

import json
import os
import shutil
import signal
import subprocess
from html import escape, unescape
from pathlib import Path

import pytest

from conftest import write_template
from test_manifest import record
from test_generate import job
from zimage_batch.manifest import read_jsonl
from zimage_batch.report import MAX_ITEMS, ordered, render_html
from zimage_batch.run import RunConfig, RunSummary

PROBE = """<script>
window.addEventListener("load", function () {
  function visible() {
    return Array.prototype.filter.call(document.querySelectorAll(".item"), function (it) {
      return it.offsetParent !== null;
    }).map(function (it) { return it.dataset.job; });
  }
  var result = {items: [], filtered: {}, groups: {}};
  document.querySelectorAll(".item").forEach(function (it) {
    var img = it.querySelector("img");
    result.items.push({job: it.dataset.job, status: it.querySelector(".status").textContent,
                       width: img ? (img.complete ? img.naturalWidth : -1) : null});
  });
  var box = document.getElementById("filter");
  QUERIES.forEach(function (q) {
    box.value = q;
    box.dispatchEvent(new Event("input"));
    result.filtered[q] = visible();
    result.groups[q] = Array.prototype.filter.call(document.querySelectorAll(".group"), function (g) {
      return g.offsetParent !== null; }).length;
    result.shown = result.shown || {};
    result.shown[q] = document.getElementById("shown").textContent;
  });
  var pre = document.createElement("pre");
  pre.id = "zb-probe";
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>"""


def probe_in_chromium(report: Path, queries: list[str], tmp_path: Path) -> dict:
    """Open a copy of the report (plus a probe script) in headless Chromium; return what the probe saw."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed here (CI installs it: apt-get install -y chromium)")
    page = tmp_path / "probe.html"
    html = report.read_text(encoding="utf-8")
    page.write_text(html.replace("</body>", PROBE.replace("QUERIES", json.dumps(queries)) + "</body>"), encoding="utf-8")
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           "--dump-dom", page.as_uri()]
    browser = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        dom, err = browser.communicate(timeout=120)
    finally:
        try:
            os.killpg(browser.pid, signal.SIGKILL)  # chromium's helper processes too
        except ProcessLookupError:
            pass
        browser.wait()
    start = dom.find('<pre id="zb-probe">')
    assert start >= 0, f"the probe did not run; chromium said: {err[-2000:]}"
    return json.loads(unescape(dom[start + len('<pre id="zb-probe">'): dom.index("</pre>", start)]))


def summary(**fields) -> RunSummary:
    base = dict(out="out", model="m", planned=3, generated=1, skipped=0, failed=1, rejected=1, rows=3, row_problems=0,
                problems=[], pipeline_loads=1, seconds=10.0, stage_seconds={}, started_at="s", finished_at="f",
                catalogs=["c.csv"], templates=["t.j2"], versions={})
    return RunSummary(**{**base, **fields})


def test_failed_and_rejected_groups_come_first_and_everything_is_escaped():
    ok = record(job(sku="A", seed=1, prompt="<script>alert(1)</script> mug"))
    bad = record(job(sku="B", seed=2), status="rejected").model_copy(update={"reasons": ["no white <b>backdrop</b>"]})
    failed = record(job(sku="C", seed=3), status="failed")
    assert [r.sku for r in ordered([ok, bad, failed])] == ["C", "B", "A"]
    html = render_html([ok, bad, failed], summary(removed=["GONE-1"]), {})
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
    assert "no white &lt;b&gt;backdrop" in html and "GONE-1" in html
    at = [html.index("data-job='" + escape(r.job_id)) for r in (failed, bad, ok)]
    assert at == sorted(at)
    assert "Content-Security-Policy" in html and "http://" not in html and "https://" not in html


def test_big_runs_are_capped_and_say_so():
    records = [record(job(sku=f"S{i}", seed=i)) for i in range(MAX_ITEMS + 3)]
    html = render_html(records, summary(generated=len(records)), {})
    assert html.count("<article") == MAX_ITEMS and f"made {MAX_ITEMS + 3:,} images" in html


@pytest.mark.usefixtures("prefect_server")
def test_report_opens_in_chromium_with_every_image_and_a_working_filter(tmp_path, small_catalog, scene_template):
    from flows.catalog_images import catalog_images

    white = write_template(tmp_path / "white.j2", "Product photo of a {{ color }} {{ kind }} on pure white",
                           "size: 256x256\npresets: [amazon_main, web]\nbackground: white")
    config = RunConfig(catalogs=[str(small_catalog)], templates=[str(scene_template), str(white)], out=str(tmp_path / "out"),
                       model="tiny-random", device="cpu", batch_size=2, shard_size=2)
    result = catalog_images(config)
    report = Path(config.out) / "report.html"
    assert result.report == str(report)
    records = {r["job_id"]: r for r in read_jsonl(Path(config.out) / "manifest.jsonl")}
    seen = probe_in_chromium(report, ["b/2", "rejected", "kitchen a-1", "no-such-thing", ""], tmp_path)

    assert sorted(i["job"] for i in seen["items"]) == sorted(records)  # every job, once
    assert all(i["width"] and i["width"] > 0 for i in seen["items"]), seen["items"]  # every thumbnail decoded
    statuses = [i["status"] for i in seen["items"]]
    assert statuses == sorted(statuses, key=lambda s: s != "rejected")  # tiny-random: white is rejected, first
    assert set(seen["filtered"]["b/2"]) == {j for j, r in records.items() if r["sku"] == "B/2"}
    assert set(seen["filtered"]["rejected"]) == {j for j, r in records.items() if r["status"] == "rejected"}
    assert set(seen["filtered"]["kitchen a-1"]) == {j for j, r in records.items() if r["sku"] == "A-1" and r["template"] == "scene"}
    assert seen["filtered"]["no-such-thing"] == [] and seen["groups"]["no-such-thing"] == 0
    assert seen["shown"]["no-such-thing"] == "0" and len(seen["filtered"][""]) == len(records)

    again = catalog_images(config)  # nothing left to make: the rejected jobs still wait for a person
    rejected = {j for j, r in records.items() if r["status"] == "rejected"}
    assert (again.generated, again.skipped, again.still_rejected) == (0, len(records), len(rejected))
    assert json.loads((Path(config.out) / "run.json").read_text())["still_rejected"] == len(rejected)
    seen = probe_in_chromium(report, ["rejected"], tmp_path)
    assert sorted(i["job"] for i in seen["items"]) == sorted(rejected) and all(i["width"] > 0 for i in seen["items"])
    html = report.read_text(encoding="utf-8")
    assert f"Rejected by earlier runs, still rejected: {len(rejected)}</h2>" in html


def test_right_to_left_text_in_a_sku_does_not_turn_the_heading_around():
    html = render_html([record(job(sku="RTL-\u202eabc"))], summary(), {})
    assert "<h2><bdi>RTL-\u202eabc</bdi> <small><bdi>t</bdi></small></h2>" in html
    assert "overflow-wrap: anywhere" in html  # long unbroken words stay in their card
