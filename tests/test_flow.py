"""End to end through the Prefect flow, with the real tiny pipeline."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import write_template
from zimage_batch.manifest import read_jsonl
from zimage_batch.run import RunConfig
from zimage_batch.store import sha256_file

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def config(tmp_path, small_catalog, scene_template):
    white = write_template(tmp_path / "white.j2", "Product photo of a {{ color }} {{ kind }} on pure white",
                           "size: 256x256\npresets: [amazon_main, web]\nbackground: white")
    return RunConfig(catalogs=[str(small_catalog)], templates=[str(scene_template), str(white)], out=str(tmp_path / "out"),
                     model="tiny-random", device="cpu", batch_size=2, shard_size=2)


def run_flow(config):
    from flows.catalog_images import catalog_images

    return catalog_images(config)


def files_of(out: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(out)): (sha256_file(p), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()
            and p.suffix in (".jpg", ".png", ".webp")}


def test_flow_runs_every_job_and_writes_manifest_parquet_and_run_json(config, monkeypatch):
    from zimage_batch import generate

    monkeypatch.setattr(generate, "_ENGINES", {})  # as in a fresh process: this run loads the pipeline
    summary = run_flow(config)
    out = Path(config.out)
    records = read_jsonl(out / "manifest.jsonl")
    assert len(records) == 6 and len({r["job_id"] for r in records}) == 6
    assert {r["status"] for r in records if r["template"] == "scene"} == {"ok"}
    assert {r["status"] for r in records if r["template"] == "white"} == {"rejected"}  # tiny-random draws noise
    for r in records:
        assert r["model"] == "tiny-random/v1" and r["steps"] == 8 and r["guidance_scale"] == 0.0
        for o in r["outputs"]:
            assert sha256_file(out / o["path"]) == o["sha256"] and (out / o["path"]).stat().st_size == o["bytes"]
    assert {r["sku"] for r in records} == {"A-1", "B/2", "C 3"}
    assert all("/" not in o["path"].split("/")[1] for r in records for o in r["outputs"])
    run = json.loads((out / "run.json").read_text())
    assert (run["planned"], run["generated"], run["rejected"], run["skipped"], run["failed"]) == (6, 3, 3, 0, 0)
    assert run["pipeline_loads"] == 1 and set(run["stage_seconds"]) >= {"load", "plan", "generate", "postprocess", "store"}
    assert pq.read_table(out / "manifest.parquet").num_rows == 6
    assert summary.exit_code == 0
    assert not list(out.rglob(".zb-tmp-*"))


def test_a_run_counts_only_the_pipeline_loads_it_made(config, tmp_path, monkeypatch):
    """A worker's preload, or an earlier run in the process (serve), loaded the engine: not this run's load."""
    from zimage_batch import generate

    monkeypatch.setattr(generate, "_ENGINES", {})
    first = run_flow(config.model_copy(update={"limit": 1}))  # loads, then ends a second or two later
    again = run_flow(config.model_copy(update={"out": str(tmp_path / "again")}))  # all six made again, same engine
    assert first.pipeline_loads == 1 and first.stage_seconds["load"] > 0
    assert (again.generated + again.rejected, again.pipeline_loads, again.stage_seconds["load"]) == (6, 0, 0)


def test_another_runs_stop_file_neither_stops_this_run_nor_is_taken_from_its_workers(config):
    """An interrupted run's shards on other machines may still be finishing: its stop file stays an hour."""
    import os
    import time

    from zimage_batch.cli import main

    out = Path(config.out)
    out.mkdir()
    young, old = out / ".zb-tmp-stop-0123456789ab", out / ".zb-tmp-stop-ba9876543210"
    young.touch()
    old.touch()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    summary = run_flow(config)
    assert summary.generated + summary.rejected == 6 and young.exists() and not old.exists()
    assert main(["verify", str(out)]) == 0  # not a stray


def test_rerun_generates_nothing_and_touches_nothing(config):
    run_flow(config)
    out = Path(config.out)
    before = files_of(out)
    summary = run_flow(config)
    assert (summary.generated, summary.rejected, summary.skipped, summary.pipeline_loads) == (0, 0, 6, 0)
    assert files_of(out) == before
    assert len(read_jsonl(out / "manifest.jsonl")) == 6


def test_altered_or_deleted_file_is_regenerated_identically(config):
    run_flow(config)
    out = Path(config.out)
    records = {r["job_id"]: r for r in read_jsonl(out / "manifest.jsonl")}
    ok = [r for r in records.values() if r["status"] == "ok"]
    altered, deleted = out / ok[0]["outputs"][0]["path"], out / ok[1]["outputs"][0]["path"]
    altered.write_bytes(altered.read_bytes()[:-10])
    deleted.unlink()
    summary = run_flow(config)
    assert (summary.generated, summary.skipped) == (2, 4)
    assert sha256_file(altered) == ok[0]["outputs"][0]["sha256"]  # same seed, same bytes on the CPU
    assert sha256_file(deleted) == ok[1]["outputs"][0]["sha256"]
    assert len(read_jsonl(out / "manifest.jsonl")) == 6


def test_two_runs_make_identical_images(config, tmp_path):
    # Same seed, same batch layout -> the same bytes. (Batched vs alone agree only up to float
    # noise, ~1e-6; see test_generate. Images are quantised to 8 bits, so a few pixels may flip.)
    run_flow(config)
    other = config.model_copy(update={"out": str(tmp_path / "again")})
    run_flow(other)
    a = {r["job_id"]: [o["sha256"] for o in r["outputs"]] for r in read_jsonl(Path(config.out) / "manifest.jsonl")}
    b = {r["job_id"]: [o["sha256"] for o in r["outputs"]] for r in read_jsonl(Path(other.out) / "manifest.jsonl")}
    assert a == b


def test_the_run_is_a_recorded_prefect_flow_run(config):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType

    run_flow(config)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["COMPLETED"]))))
        names = {client.read_flow(r.flow_id).name for r in runs}
        assert "catalog-images" in names
        tasks = client.read_task_runs()
        assert {"plan", "generate-shard", "finish"} <= {t.name.rsplit("-", 1)[0] for t in tasks}


def test_a_signed_run_verifies_and_every_file_carries_its_provenance(config, certificates):
    from zimage_batch.provenance import read_embedded
    from zimage_batch.verify import LocalFolder, verify

    signed = config.model_copy(update={"c2pa_cert": str(certificates["chain"]), "c2pa_key": str(certificates["key"])})
    run_flow(signed)
    out = Path(config.out)
    report = verify(LocalFolder(out), certificates["ca"].read_bytes())
    assert report.ok, report.findings
    assert report.files == report.signed == 6  # 3 scene jobs (web JPEG) + 3 white jobs (rejected noise, raw PNG)
    for record in read_jsonl(out / "manifest.jsonl"):
        for output in record["outputs"]:
            embedded = read_embedded((out / output["path"]).read_bytes())
            assert embedded.xmp["zb:jobId"] == record["job_id"] and embedded.parameters["Seed"] == str(record["image_seed"])


def test_the_run_publishes_progress_summary_and_report_artifacts(config, monkeypatch):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows import artifacts
    from flows.catalog_images import catalog_images

    updates = []
    real_update = artifacts.update_progress_artifact
    monkeypatch.setattr(artifacts, "update_progress_artifact",
                        lambda artifact_id, progress: updates.append(progress) or real_update(artifact_id, progress))
    state = catalog_images(config, return_state=True)
    summary = state.result()
    assert updates == [33.33, 66.67, 100.0]  # 6 jobs in shards of 2: one update per finished shard
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    by_key = {a.key: a for a in found}
    assert set(by_key) == {"catalog-images-progress", "catalog-images-summary", "catalog-images-report"}
    assert by_key["catalog-images-progress"].type == "progress" and by_key["catalog-images-progress"].data == 100.0
    table = json.loads(by_key["catalog-images-summary"].data) if isinstance(by_key["catalog-images-summary"].data, str) \
        else by_key["catalog-images-summary"].data
    values = {row["what"]: row["value"] for row in table}
    assert (values["planned"], values["generated"], values["rejected"], values["failed"]) == ("6", "3", "3", "0")
    report = (Path(config.out) / "report.html").resolve()
    assert report.as_uri() in by_key["catalog-images-report"].data and summary.report == config.out + "/report.html"


def test_without_dask_two_shards_run_at_once_so_one_finishes_while_the_next_generates(config, monkeypatch):
    import threading

    from zimage_batch import run

    running, most, lock = [0], [0], threading.Lock()
    real = run.run_shard

    def counted(*args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return real(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(run, "run_shard", counted)  # the real shard work, counted
    summary = run_flow(config)  # 6 jobs in shards of 2: three shards
    assert most[0] == 2  # two at once (the engine's lock keeps generation to one), never all three
    assert summary.generated + summary.rejected == 6 and summary.failed == 0
    assert len({r["job_id"] for r in read_jsonl(Path(config.out) / "manifest.jsonl")}) == 6
