"""Prefect artifacts of a catalog-images run: live progress, the summary table and a link to the report.

Artifacts are how a run shows up in the Prefect UI (a deployment's runs tab, the artifacts page);
the keys stay the same from run to run, so Prefect keeps each key's history.
"""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)

from zimage_batch.manifest import MANIFEST, REPORT_HTML, RUN_JSON
from zimage_batch.run import RunPlan, RunSummary

PROGRESS_KEY = "catalog-images-progress"
SUMMARY_KEY = "catalog-images-summary"
REPORT_KEY = "catalog-images-report"


class Progress:
    """A progress artifact (percent of this run's pending images done), updated as shards finish."""

    def __init__(self, plan: RunPlan):
        self.total = plan.pending
        self.done = 0
        self.id: UUID = create_progress_artifact(
            100.0 if not self.total else 0.0, key=PROGRESS_KEY,
            description=f"{plan.pending} images to make, {plan.skipped} already done, of {plan.planned} planned")

    def advance(self, images: int) -> None:
        self.done += images
        update_progress_artifact(self.id, self.percent)

    @property
    def percent(self) -> float:
        return 100.0 if not self.total else round(min(100.0, 100.0 * self.done / self.total), 2)


def summary_rows(summary: RunSummary) -> list[dict[str, str]]:
    """The run summary as a two-column table."""
    images = summary.generated + summary.rejected + summary.failed
    rows = {
        "planned": summary.planned, "generated": summary.generated, "skipped (already done)": summary.skipped,
        "rejected": summary.rejected, "failed": summary.failed, "removed from catalog": len(summary.removed),
        "seconds": summary.seconds, "images per hour": round(images / summary.seconds * 3600) if images and summary.seconds else 0,
        "pipeline loads": summary.pipeline_loads, "model": summary.model, "out": summary.out,
    }
    return [{"what": k, "value": str(v)} for k, v in rows.items()]


def report_markdown(summary: RunSummary) -> str:
    """A short markdown note linking the report, the manifest and run.json."""
    out = Path(summary.out).resolve()
    lines = [
        f"# catalog-images: {summary.generated} generated, {summary.rejected} rejected, {summary.failed} failed",
        "",
        f"- Report (contact sheet): [{out / REPORT_HTML}]({(out / REPORT_HTML).as_uri()})",
        f"- Manifest: `{out / MANIFEST}`",
        f"- Summary: `{out / RUN_JSON}`",
    ]
    if summary.manifest_uri:  # delivered to S3: links anyone with the note can open for a week
        from zimage_batch.deliver import presign

        base = summary.manifest_uri.rsplit("/", 1)[0]
        links = ", ".join(f"[{name}]({presign(f'{base}/{name}')})" for name in (REPORT_HTML, MANIFEST, RUN_JSON))
        lines.append(f"- Delivered to `{base}` (links valid 7 days): {links}")
    if summary.removed:
        shown = ", ".join(summary.removed[:20]) + (" ..." if len(summary.removed) > 20 else "")
        lines.append(f"- {len(summary.removed)} product(s) removed from the catalog since earlier runs (kept): {shown}")
    return "\n".join(lines) + "\n"


def publish_summary(summary: RunSummary) -> None:
    """The summary table and the report link."""
    create_table_artifact(summary_rows(summary), key=SUMMARY_KEY, description=f"zimage-batch run into {summary.out}")
    create_markdown_artifact(report_markdown(summary), key=REPORT_KEY, description="the run report")
