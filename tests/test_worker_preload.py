"""The worker preload (``--preload zimage_batch.worker``) on a real `dask scheduler` and `dask worker`."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zimage_batch.errors import ZImageBatchError
from zimage_batch.worker import warm_config

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


@pytest.fixture(scope="module")
def scheduler():
    port = free_port()
    process = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                "--dashboard-address", ":0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "the scheduler did not start"
                time.sleep(0.2)
        yield f"tcp://127.0.0.1:{port}"
    finally:
        stop(process)


def start_worker(scheduler: str, folder: Path, **variables: str) -> tuple[subprocess.Popen, Path]:
    """`dask worker --preload zimage_batch.worker` with the given ZIMAGE_BATCH_* variables; its log file."""
    env = {k: v for k, v in os.environ.items()  # as a user starts it: not with a level an in-process CLI call set
           if (not k.startswith("ZIMAGE_BATCH_") or k == "ZIMAGE_BATCH_CACHE") and k != "DASK_LOGGING__DISTRIBUTED"}
    env.update({"ZIMAGE_BATCH_DEVICE": "cpu", **variables})
    log = folder / "worker.log"
    with open(log, "w") as out:
        process = subprocess.Popen([str(BIN / "dask"), "worker", scheduler, "--nthreads", "1", "--no-dashboard",
                                    "--local-directory", str(folder), "--preload", "zimage_batch.worker"],
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    return process, log


def preload_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if " - zimage_batch.worker - " in line]


@pytest.mark.slow
def test_the_loaded_pipeline_is_announced_in_the_workers_log(scheduler, tmp_path):
    from distributed import Client

    process, log = start_worker(scheduler, tmp_path, ZIMAGE_BATCH_MODEL="tiny-random")
    try:
        with Client(scheduler, timeout=30) as client:
            client.wait_for_workers(1, timeout=90)
        lines = preload_lines(log)
        assert len(lines) == 1 and "Failed to start preload" not in log.read_text(), log.read_text()
        assert re.search(r" - INFO - zimage-batch: tiny-random/v1 loaded on cpu in \d+\.\d s "
                         r"\(worker tcp://127\.0\.0\.1:\d+\)$", lines[0]), lines[0]
    finally:
        stop(process)


@pytest.mark.slow
@pytest.mark.parametrize("variables, status, said", [
    ({"ZIMAGE_BATCH_MODEL": "zimage-batch-tests/not-cached"}, 3, "hf download zimage-batch-tests/not-cached"),
    ({"ZIMAGE_BATCH_MODEL": "tiny-random", "ZIMAGE_BATCH_VRAM_GB": "16GB"}, 2,
     "ZIMAGE_BATCH_VRAM_GB='16GB' in the worker's environment is not a whole number of GB from 12 to 200"),
    ({"ZIMAGE_BATCH_MODEL": "tiny-random", "ZIMAGE_BATCH_COMPILE": "maybe"}, 2,
     "ZIMAGE_BATCH_COMPILE='maybe' in the worker's environment is not 1, true, yes, on, 0, false, no or off"),
])
def test_a_worker_whose_preload_fails_stops_with_one_line_saying_why(scheduler, tmp_path, variables, status, said):
    from distributed import Client

    process, log = start_worker(scheduler, tmp_path, **variables)
    try:
        try:
            code = process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker stayed up after its preload failed:\n{log.read_text()[-2000:]}")
        text = log.read_text()
        assert code != 0
        assert len(preload_lines(log)) == 1, text
        line = preload_lines(log)[0]
        worker = re.search(r"ERROR - zimage-batch: worker (tcp://127\.0\.0\.1:\d+) stops \(status (\d)\)", line)
        assert worker and int(worker[2]) == status and said in line, line
        assert f"exited with status {status}" in text and "Failed to start preload" not in text
        with Client(scheduler, timeout=30) as client:
            assert worker[1] not in client.scheduler_info(n_workers=-1)["workers"]
    finally:
        stop(process)


def test_compile_takes_the_usual_words_for_yes_and_no(monkeypatch):
    words = {"1": True, "true": True, "Yes": True, "on": True, "0": False, "false": False, "NO": False, "off": False}
    seen = {}
    for value in words:
        monkeypatch.setenv("ZIMAGE_BATCH_COMPILE", value)
        seen[value] = warm_config().compile
    assert seen == words


@pytest.mark.parametrize("name, value, expected", [
    ("ZIMAGE_BATCH_VRAM_GB", "16GB", "a whole number of GB from 12 to 200"),
    ("ZIMAGE_BATCH_VRAM_GB", "8", "a whole number of GB from 12 to 200"),
    ("ZIMAGE_BATCH_DEVICE", "gpu", "one of auto, cuda, cpu"),
    ("ZIMAGE_BATCH_PRECISION", "fp16", "one of bf16, fp8"),
])
def test_a_bad_value_names_the_variable_and_what_it_takes(monkeypatch, name, value, expected):
    monkeypatch.setenv(name, value)
    with pytest.raises(ZImageBatchError, match=f"{name}='{value}' in the worker's environment is not {expected}"):
        warm_config()


def test_empty_values_are_unset_and_take_the_runs_defaults(monkeypatch):
    for name in ("MODEL", "DEVICE", "COMPILE", "VRAM_GB", "PRECISION"):
        monkeypatch.setenv(f"ZIMAGE_BATCH_{name}", "")  # as `NAME=` in a systemd EnvironmentFile sets it
    config = warm_config()
    assert (config.model, config.device, config.compile, config.vram_gb, config.precision) == \
        ("Tongyi-MAI/Z-Image-Turbo", "auto", None, None, "bf16")
