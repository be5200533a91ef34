"""Deployments served by ``zimage-batch serve``: ``nightly-catalog`` (a cron schedule with a time zone)
and ``campaign`` (run on demand with parameters), both of the ``catalog-run`` flow.

    zimage-batch serve --catalog 'catalogs/*.csv' -t templates/product_white.j2 --out /data/out \\
        --cron "0 2 * * *" --timezone Europe/Berlin

Trigger the campaign deployment from the Prefect UI, or from a shell::

    prefect deployment run catalog-run/campaign --param config='{"catalogs": ["campaign.csv"],
        "templates": ["templates/poster_text.j2"], "out": "/data/campaigns/spring", "model": "Tongyi-MAI/Z-Image-Turbo"}'

The flow's one parameter is the run's ``RunConfig`` (catalogs, templates, out, model, ...), so the UI
shows it as a form. The nightly deployment carries its config as default parameters. Its paths are
read on the machine ``serve`` runs on, relative to the folder it runs in: give absolute ones.
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.states import Failed, State
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from flows.catalog_images import run_catalog
from zimage_batch.errors import ZImageBatchError
from zimage_batch.generate import pick_device
from zimage_batch.run import RunConfig, RunSummary

NIGHTLY = "nightly-catalog"
CAMPAIGN = "campaign"


@flow(name="catalog-run", log_prints=False)
def catalog_run(config: RunConfig) -> RunSummary | State:
    """One catalog-images run, on the task runner its config asks for (in-process or Dask).

    A problem with its inputs or setup (a catalog that is not there, a full --out, ...) fails the run
    with that one paragraph as the state's message, in the Prefect UI and in serve's terminal,
    rather than a traceback only the flow run's logs show."""
    try:
        device = config.device if config.cluster else pick_device(config.device)  # a cluster's workers pick their own
        summary = run_catalog(config, device)  # --workers on a GPU host: one worker per GPU
    except ZImageBatchError as exc:
        return _failed(f"{type(exc).__name__}: {exc}")
    if summary.failed:
        return _failed(f"{summary.failed} job(s) failed; see {summary.out}/manifest.jsonl. Run again to retry them.")
    return summary


def _failed(message: str) -> State:
    context = FlowRunContext.get()
    name = context.flow_run.name if context else "catalog-run"
    print(f"catalog-run {name!r} failed: {message}", file=sys.stderr, flush=True)  # serve's terminal (its child's stderr)
    get_run_logger().error(message)
    return Failed(message=message)


def deployments(nightly: RunConfig, cron: str = "0 2 * * *", timezone: str = "UTC") -> list[RunnerDeployment]:
    """The nightly deployment (scheduled, with ``nightly`` as its parameters) and the on-demand campaign one."""
    common = dict(entrypoint_type=EntrypointType.MODULE_PATH, tags=["zimage-batch"])
    return [
        catalog_run.to_deployment(NIGHTLY, schedules=[Cron(cron, timezone=timezone)],
                                  parameters={"config": nightly.model_dump(mode="json", exclude_defaults=True)},
                                  description="The nightly run over the catalog: makes only new or changed products.",
                                  **common),
        catalog_run.to_deployment(CAMPAIGN, description="A campaign batch, run on demand with its own config.", **common),
    ]
