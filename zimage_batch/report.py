"""The run report, ``OUT/report.html``: a contact sheet a reviewer opens offline.

One self-contained file: thumbnails are small JPEGs embedded as ``data:`` URIs, styles and a
plain-JS text filter are inline, and a Content-Security-Policy forbids any network request.
It shows this run's records (the work to review), grouped by product and template, failed and
rejected groups first, then the jobs of this plan that earlier runs rejected (still waiting for a
person: a rerun with nothing new would otherwise show none), each with its prompt, seed, status and
quality-gate reasons; the run's statistics (counts, images per hour, seconds per image, images per worker) and the products
removed from the catalog since earlier runs. Big runs are capped: the first ``MAX_ITEMS`` records
are listed and the first ``MAX_THUMBNAILS`` of those get a thumbnail; the page says so.

``render_html`` is pure (records + summary + thumbnails -> HTML); ``write_report`` reads the
images, makes the thumbnails and writes the file atomically.
"""

from __future__ import annotations

import base64
import io
from collections import Counter, defaultdict
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from .manifest import REPORT_HTML, ManifestRecord
from .store import write_atomic

if TYPE_CHECKING:
    from .run import RunSummary

THUMB_SIZE = 256
MAX_THUMBNAILS = 1000
MAX_ITEMS = 5000
_ORDER = {"failed": 0, "rejected": 1, "ok": 2}


def ordered(records: Sequence[ManifestRecord]) -> list[ManifestRecord]:
    """Records grouped by (sku, template), groups with a failed, then a rejected item first."""
    groups: dict[tuple[str, str], list[ManifestRecord]] = defaultdict(list)
    for record in records:
        groups[(record.sku, record.template)].append(record)
    keys = sorted(groups, key=lambda k: (min(_ORDER[r.status] for r in groups[k]), k))
    return [r for k in keys for r in sorted(groups[k], key=lambda r: (_ORDER[r.status], r.variant, r.job_id))]


def thumbnail_uri(path: Path, size: int = THUMB_SIZE) -> str | None:
    """A JPEG thumbnail of ``path`` (long side ``size``) as a data: URI; None if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
            image = image.convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=75)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def smallest_output(record: ManifestRecord) -> str | None:
    """The path of the record's output with the fewest pixels (fastest to thumbnail)."""
    if not record.outputs:
        return None
    return min(record.outputs, key=lambda o: o.width * o.height).path


def write_report(out: str | Path, records: Sequence[ManifestRecord], summary: RunSummary,
                 earlier: Sequence[ManifestRecord] = ()) -> Path:
    """Make thumbnails for the listed records (this run's, then ``earlier`` rejections still standing)
    and write ``OUT/report.html``; return its path."""
    out = Path(out)
    listed = [*ordered(records)[:MAX_ITEMS], *ordered(earlier)[:MAX_ITEMS]]
    thumbnails = {}
    for record in listed[:MAX_THUMBNAILS]:
        path = smallest_output(record)
        uri = thumbnail_uri(out / path) if path else None
        if uri:
            thumbnails[record.job_id] = uri
    target = out / REPORT_HTML
    write_atomic(target, render_html(records, summary, thumbnails, earlier).encode("utf-8"))
    return target


def rate_figures(summary: RunSummary, images: int) -> tuple[str, str]:
    """(images per hour, seconds per image) over the run's wall time, or dashes when nothing was made."""
    if not images or summary.seconds <= 0:
        return "-", "-"
    return f"{images / summary.seconds * 3600:,.0f}", f"{summary.seconds / images:.2f}"


def render_html(records: Sequence[ManifestRecord], summary: RunSummary, thumbnails: dict[str, str],
                earlier: Sequence[ManifestRecord] = ()) -> str:
    """The report page for this run's ``records`` and the ``earlier`` rejections this run's plan still
    holds (skipped as done; a rerun or a night with nothing new would otherwise show none) (pure: no I/O)."""
    listed = ordered(records)
    shown = listed[:MAX_ITEMS]
    before = ordered(earlier)[:MAX_ITEMS]
    images = len(records)
    per_hour, per_image = rate_figures(summary, images)
    workers = Counter(r.worker or "?" for r in records)
    stats = [
        ("planned", summary.planned), ("generated", summary.generated), ("skipped (already done)", summary.skipped),
        ("rejected", summary.rejected), ("failed", summary.failed), ("removed from catalog", len(summary.removed)),
        ("images per hour", per_hour), ("seconds per image", per_image), ("wall time (s)", f"{summary.seconds:.1f}"),
        ("pipeline loads", summary.pipeline_loads),
    ]
    notes = []
    if len(listed) > len(shown):
        notes.append(f"This run made {len(listed):,} images; the first {len(shown):,} are listed (failed and rejected "
                     f"first). All are in manifest.jsonl.")
    if len(shown) + len(before) > MAX_THUMBNAILS:
        notes.append(f"Thumbnails are included for the first {MAX_THUMBNAILS:,} listed images only.")
    if summary.skipped:
        again = (f"; the {summary.still_rejected:,} of them that were rejected are listed again below"
                 if summary.still_rejected else "")
        notes.append(f"{summary.skipped:,} planned jobs were already done by earlier runs and are not listed{again}.")
    parts = [_HEAD.format(title=escape(f"zimage-batch run report: {summary.out}"))]
    parts.append(f"<h1>Run report <small>{escape(summary.out)}</small></h1>")
    parts.append(f"<p class=meta>{escape(summary.started_at)} to {escape(summary.finished_at)} · model "
                 f"{escape(summary.model)} · catalogs {escape(', '.join(summary.catalogs))} · templates "
                 f"{escape(', '.join(summary.templates))}</p>")
    parts.append("<table class=stats id=stats>" + "".join(
        f"<tr><th>{escape(k)}</th><td data-stat='{escape(k)}'>{escape(str(v))}</td></tr>" for k, v in stats) + "</table>")
    parts.append("<table class=workers id=workers><tr><th>worker</th><th>images</th></tr>" + "".join(
        f"<tr><td>{escape(w)}</td><td>{n}</td></tr>" for w, n in sorted(workers.items())) + "</table>")
    if summary.removed:
        parts.append(f"<details id=removed><summary>{len(summary.removed):,} product(s) removed from the catalog since "
                     f"earlier runs (their images are kept)</summary><p>"
                     + ", ".join(f"<code>{escape(s)}</code>" for s in summary.removed) + "</p></details>")
    for note in notes:
        parts.append(f"<p class=note>{escape(note)}</p>")
    total = len(shown) + len(before)
    parts.append(f"<p><input id=filter type=search placeholder='filter: sku, template, status, prompt words...' "
                 f"autofocus> <span id=shown>{total}</span> of {total} shown</p>")
    parts.append(_groups(shown, thumbnails))
    if before:
        more = f" (the first {len(before):,} listed)" if summary.still_rejected > len(before) else ""
        parts.append(f"<h2 id=earlier>Rejected by earlier runs, still rejected: {summary.still_rejected:,}{more}</h2>"
                     f"<p class=note>Not made again: fix the template or preset and rerun, or accept them. Their files "
                     f"are in rejected/.</p>")
        parts.append(_groups(before, thumbnails))
    parts.append(_TAIL)
    return "".join(parts)


def _groups(records: Sequence[ManifestRecord], thumbnails: dict[str, str]) -> str:
    html, current = [], None
    for record in records:
        key = (record.sku, record.template)
        if key != current:
            if current is not None:
                html.append("</div></section>")
            current = key
            html.append(f"<section class=group><h2><bdi>{escape(record.sku)}</bdi> <small><bdi>{escape(record.template)}</bdi></small></h2>"
                        f"<div class=items>")
        html.append(_item(record, thumbnails.get(record.job_id)))
    if current is not None:
        html.append("</div></section>")
    return "".join(html)


def _item(record: ManifestRecord, thumbnail: str | None) -> str:
    if thumbnail:
        picture = f"<img src='{thumbnail}' alt='{escape(record.sku)} v{record.variant}'>"
    else:
        picture = f"<div class=noimg>{'no image' if not record.outputs else 'no thumbnail'}</div>"
    reasons = "".join(f"<li>{escape(r)}</li>" for r in record.reasons)
    files = " ".join(f"<a href='{escape(o.path)}'>{escape(o.preset)}</a>" for o in record.outputs)
    return (
        f"<article class='item {record.status}' data-job='{escape(record.job_id)}'>{picture}"
        f"<p><b class=status>{record.status}</b> v{record.variant} · seed {record.seed}"
        f"{'' if record.image_seed in (None, record.seed) else f' (image seed {record.image_seed})'}"
        f" · {record.width}x{record.height}</p>"
        + (f"<ul class=reasons>{reasons}</ul>" if reasons else "")
        + f"<p class=prompt>{escape(record.prompt)}</p>"
        f"<p class=small>{escape(record.job_id)} · {escape(record.worker)} · {files}</p></article>"
    )


_HEAD = """<!doctype html>
<html lang=en><head><meta charset=utf-8>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name=viewport content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
small, .meta, .small {{ color: #666; font-weight: normal; }}
table {{ border-collapse: collapse; margin: 0 2em 1em 0; display: inline-table; vertical-align: top; }}
th, td {{ border: 1px solid #ddd; padding: 2px 8px; text-align: left; }}
.note {{ background: #fff8e1; padding: 4px 8px; }}
#filter {{ width: 28em; padding: 4px; }}
.group h2 {{ font-size: 16px; margin: 1em 0 .3em; }}
.items {{ display: flex; flex-wrap: wrap; gap: 10px; }}
.item {{ width: 264px; border: 2px solid #cde; border-radius: 6px; padding: 4px; overflow-wrap: anywhere; }}
.item.rejected {{ border-color: #f0a030; }} .item.failed {{ border-color: #d33; }}
.item img, .noimg {{ width: 256px; height: 256px; object-fit: contain; background: #eee; display: block; }}
.noimg {{ display: flex; align-items: center; justify-content: center; color: #999; }}
.item p {{ margin: .3em 0; }} .prompt {{ font-size: 12px; }}
.reasons {{ color: #a40; margin: .2em 0; padding-left: 1.2em; }}
.status {{ text-transform: uppercase; font-size: 12px; }}
</style></head><body>
"""

_TAIL = """
<script>
(function () {
  var box = document.getElementById("filter");
  var items = Array.prototype.slice.call(document.querySelectorAll(".item"));
  items.forEach(function (it) {
    it.zbText = (it.closest(".group").querySelector("h2").textContent + " " + it.textContent).toLowerCase();
  });
  function apply() {
    var words = box.value.toLowerCase().split(/\\s+/).filter(Boolean), shown = 0;
    items.forEach(function (it) {
      var hit = words.every(function (w) { return it.zbText.indexOf(w) >= 0; });
      it.hidden = !hit;
      if (hit) shown++;
    });
    document.querySelectorAll(".group").forEach(function (g) {
      g.hidden = !g.querySelector(".item:not([hidden])");
    });
    document.getElementById("shown").textContent = shown;
  }
  box.addEventListener("input", apply);
  apply();
})();
</script>
</body></html>
"""
