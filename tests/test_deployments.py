"""`zimage-batch serve` on a real Prefect server: the deployments exist, and triggered runs make the images."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, write_csv, write_template
from zimage_batch.manifest import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
CLI = str(Path(sys.executable).parent / "zimage-batch")


def stop_serving(proc: subprocess.Popen) -> None:
    """Stop `serve` (SIGTERM, then SIGKILL) and the flow-run processes it started: its whole group."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_for_deployments(client, proc, names: list[str]) -> dict:
    """The deployments once `serve` has registered them (fails if serve exits first)."""
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"serve exited with {proc.returncode}: {proc.stderr.read()[-3000:]}"
        try:
            return {name: client.read_deployment_by_name(name) for name in names}
        except ObjectNotFound:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def flow_run_logs(flow_run_id, until: str) -> list[str]:
    """The messages a flow run sent to the Prefect server, once one holds ``until`` (they arrive in
    batches), or all there are after 30 s."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            if any(until in log.message for log in logs) or time.monotonic() > deadline:
                return [log.message for log in logs]
            time.sleep(0.5)


def test_serve_registers_nightly_and_campaign_and_runs_them(tmp_path):
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    catalog = write_csv(tmp_path / "nightly.csv", ["sku", "title"], [["N-1", "Mug"], ["N-2", "Lamp"]])
    campaign = write_csv(tmp_path / "spring.csv", ["sku", "title"], [["S-1", "Kite"]])
    template = write_template(tmp_path / "shot.j2", "A {{ title }} on a table", "size: 256x256\npresets: [web]")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_LOGGING_LEVEL", None)  # as a user runs it
    cmd = [CLI, "serve", "--catalog", str(catalog), "-t", str(template), "--out", str(tmp_path / "nightly"),
           "--model", "simulated:0", "--device", "cpu", "--cron", "30 1 * * *", "--timezone", "Europe/Berlin"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        with get_client(sync_client=True) as client:
            found = wait_for_deployments(client, proc, ["catalog-run/nightly-catalog", "catalog-run/campaign"])
        nightly = found["catalog-run/nightly-catalog"]
        schedule = nightly.schedules[0].schedule
        assert (schedule.cron, schedule.timezone) == ("30 1 * * *", "Europe/Berlin")
        assert nightly.parameters["config"]["catalogs"] == [str(catalog)]
        assert found["catalog-run/campaign"].schedules == []

        run = run_deployment("catalog-run/nightly-catalog", timeout=300, poll_interval=1, as_subflow=False)
        assert run.state.is_completed(), run.state
        assert "Finished in state Completed" in " ".join(flow_run_logs(run.id, "Finished in state"))  # its logs reach the Prefect UI
        spring = {"catalogs": [str(campaign)], "templates": [str(template)], "out": str(tmp_path / "spring"),
                  "model": "simulated:0", "device": "cpu"}
        run = run_deployment("catalog-run/campaign", parameters={"config": spring}, timeout=300, poll_interval=1,
                             as_subflow=False)
        assert run.state.is_completed(), run.state
        wrong = {**spring, "catalogs": ["autumn.csv"], "out": str(tmp_path / "autumn")}
        run = run_deployment("catalog-run/campaign", parameters={"config": wrong}, timeout=300, poll_interval=1,
                             as_subflow=False)
        assert run.state.is_failed() and "Catalog autumn.csv does not exist" in run.state.message, run.state
        assert f"(it is relative to {tmp_path})" in run.state.message  # the folder serve runs in
    finally:
        stop_serving(proc)
    served = proc.stderr.read()
    assert f"catalog-run {run.name!r} failed: PlanError: " in served and "Traceback" not in served, served[-3000:]
    assert sorted(r["sku"] for r in read_jsonl(tmp_path / "nightly/manifest.jsonl")) == ["N-1", "N-2"]
    assert [r["sku"] for r in read_jsonl(tmp_path / "spring/manifest.jsonl")] == ["S-1"]
    assert json.loads((tmp_path / "spring/run.json").read_text())["generated"] == 1
    assert (tmp_path / "nightly/report.html").is_file()


def test_serve_with_a_bad_catalog_is_a_clear_error_and_serves_nothing(tmp_path, capsys):
    from zimage_batch.cli import main

    template = write_template(tmp_path / "shot.j2", "A {{ title }}")
    code = main(["serve", "--catalog", str(tmp_path / "missing.csv"), "-t", str(template), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "missing.csv does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_serve_keeps_an_s3_catalog_a_uri(tmp_path, capsys, s3):
    from zimage_batch.cli import main

    template = write_template(tmp_path / "shot.j2", "A {{ title }}")
    uri = f"s3://{s3.bucket}/nightly/missing.csv"
    code = main(["serve", "--catalog", uri, "-t", str(template), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"{uri} does not exist (no such object" in err  # looked up in the bucket, not as a local path


@pytest.mark.parametrize("flags, phrase", [(["--vram", "8"], "--vram 8 is out of range: use 12..200"),
                                           (["--precision", "fp8", "--device", "cpu"], "--precision fp8 needs an NVIDIA GPU"),
                                           (["--limit", "5"], "serve has no --limit: --concurrency 5 sets the flow runs at once")])
def test_serve_checks_the_engine_options_before_serving(tmp_path, capsys, flags, phrase):
    from zimage_batch.cli import main

    catalog = write_csv(tmp_path / "c.csv", ["sku", "title"], [["A-1", "Mug"]])
    template = write_template(tmp_path / "shot.j2", "A {{ title }}")
    code = main(["serve", "--catalog", str(catalog), "-t", str(template), "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert code in (2, 3) and phrase in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_the_nightly_deployment_carries_the_engine_options(tmp_path):
    from flows.deployments import deployments
    from zimage_batch.run import RunConfig

    config = RunConfig(catalogs=["c.csv"], templates=["t.j2"], out=str(tmp_path), vram_gb=16, precision="fp8", compile=False)
    nightly = deployments(config)[0].parameters["config"]
    assert nightly["vram_gb"] == 16 and nightly["precision"] == "fp8" and nightly["compile"] is False


def test_the_nightly_run_takes_the_run_options_with_absolute_paths(tmp_path, monkeypatch):
    from zimage_batch.cli import build_parser, serve_config

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(
        ["serve", "--catalog", "c.csv", "--catalog", "s3://bucket/c.csv", "-t", "t.j2", "--out", "nightly",
         "--dest", "s3://assets/nightly", "--presets-file", "my_presets.toml", "--size", "768x768", "--steps", "9",
         "--batch-size", "8", "--c2pa-cert", "certs/chain.pem", "--c2pa-key", "certs/key.pem", "--concurrency", "2"])
    config = serve_config(args)
    assert config.catalogs == [str(tmp_path / "c.csv"), "s3://bucket/c.csv"] and config.out == str(tmp_path / "nightly")
    assert (config.dest, config.size, config.steps, config.batch_size) == ("s3://assets/nightly", "768x768", 9, 8)
    assert config.presets_file == str(tmp_path / "my_presets.toml") and config.c2pa_cert == str(tmp_path / "certs/chain.pem")
    assert args.concurrency == 2


def test_a_served_cluster_run_leaves_the_device_to_the_workers(tmp_path):
    """serve may run on a machine without the GPU its cluster's workers have."""
    from flows.deployments import catalog_run
    from zimage_batch.run import RunConfig

    catalog = write_csv(tmp_path / "c.csv", ["sku", "title"], [["S-1", "Kite"]])
    template = write_template(tmp_path / "t.j2", "A {{ title }}", "size: 256x256\npresets: [png]")
    config = RunConfig(catalogs=[str(catalog)], templates=[str(template)], out=str(tmp_path / "o"), device="cuda",
                       cluster="tcp://127.0.0.1:1")
    state = catalog_run(config, return_state=True)
    assert state.is_failed() and "cannot be reached" in state.message and "--device" not in state.message, state.message


def test_serve_on_its_own_local_server_runs_the_nightly_on_its_cron(tmp_path):
    """Without PREFECT_API_URL, serve starts a local Prefect server with its scheduler on (Prefect's
    embedded server has it off, so the cron never fired), and the nightly run happens by itself."""
    catalog = write_csv(tmp_path / "nightly.csv", ["sku", "title"], [["N-1", "Mug"]])
    template = write_template(tmp_path / "shot.j2", "A {{ title }} on a table", "size: 256x256\npresets: [web]")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env.pop("PREFECT_LOGGING_LEVEL", None)
    cmd = [CLI, "serve", "--catalog", str(catalog), "-t", str(template), "--out", str(tmp_path / "nightly"),
           "--model", "simulated:0", "--device", "cpu", "--cron", "* * * * *"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 200  # the next minute, the scheduler's loop, the run
        while not (tmp_path / "nightly/manifest.jsonl").is_file():
            assert proc.poll() is None, f"serve exited with {proc.returncode}: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no scheduled run made the nightly images"
            time.sleep(1)
    finally:
        stop_serving(proc)
    assert [r["sku"] for r in read_jsonl(tmp_path / "nightly/manifest.jsonl")] == ["N-1"]
