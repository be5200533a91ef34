"""Scaling out on real Dask workers (LocalCluster processes on the CPU), through the Prefect flow."""

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import RecordingEngine, write_csv, write_template
from test_generate import job
from zimage_batch.manifest import Manifest, read_jsonl
from zimage_batch.run import RunConfig
from zimage_batch.shard import process_shard
from zimage_batch.store import LocalStore, sha256_file

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def catalog(tmp_path):
    rows = [[f"P-{i:02d}", f"Product {i}", ("red", "blue", "green")[i % 3], ("mug", "bottle")[i % 2]] for i in range(8)]
    return write_csv(tmp_path / "cat.csv", ["sku", "title", "color", "kind"], rows)


@pytest.fixture
def templates(tmp_path):
    scene = write_template(tmp_path / "scene.j2", "A {{ color }} {{ kind }}: {{ title }}", "size: 256x256\npresets: [png]")
    white = write_template(tmp_path / "white.j2", "Studio photo of a {{ color }} {{ kind }} on white",
                           "size: 256x256\npresets: [web]\nbackground: white")
    return [str(scene), str(white)]


def run_flow(config):
    from flows.catalog_images import run_catalog

    return run_catalog(config, "cpu")


def hashes(out) -> dict[str, list[str]]:
    return {r["job_id"]: [o["sha256"] for o in r["outputs"]] for r in read_jsonl(Path(out) / "manifest.jsonl")}


def test_images_do_not_depend_on_the_number_of_workers(tmp_path, catalog, templates):
    base = dict(catalogs=[str(catalog)], templates=templates, model="tiny-random", device="cpu", batch_size=2)
    one = run_flow(RunConfig(**base, out=str(tmp_path / "one"), workers=1, shard_size=3))
    two = run_flow(RunConfig(**base, out=str(tmp_path / "two"), workers=2, shard_size=3))
    here = run_flow(RunConfig(**base, out=str(tmp_path / "here"), shard_size=16))  # in-process, other shards
    assert one.planned == two.planned == 16
    assert hashes(tmp_path / "one") == hashes(tmp_path / "two") == hashes(tmp_path / "here")
    records = read_jsonl(tmp_path / "two/manifest.jsonl")
    workers = {r["worker"] for r in records}
    assert 1 <= len(workers) <= 2 and two.pipeline_loads == len(workers)
    assert one.pipeline_loads == 1
    assert not (tmp_path / "two/.parts").exists()


def test_workers_on_a_gpu_host_get_one_gpu_each(tmp_path, catalog, templates, monkeypatch):
    """--workers on CUDA: one worker process per GPU, each seeing only its own, without dask-cuda (no
    release of it installs beside distributed 2026.8). Run here with the CPU doing the work."""
    from distributed import Client

    from flows.catalog_images import catalog_images
    from zimage_batch.cluster import ClusterError, gpu_cluster, task_runner, visible_gpus

    with gpu_cluster(["0", "1"]) as cluster, Client(cluster) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        resources = [w["resources"] for w in client.scheduler_info()["workers"].values()]
    assert sorted(seen.values()) == ["0", "1"] and resources == [{"GPU": 2}, {"GPU": 2}]
    assert all(address.startswith("tcp://127.0.0.1:") for address in seen)  # a worker runs what it is sent: loopback only

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a, GPU-b")  # as a host that lends this process two GPUs says
    config = RunConfig(catalogs=[str(catalog)], templates=templates, model="simulated:0.1", out=str(tmp_path / "out"),
                       workers=2, shard_size=2, device="cpu")
    summary = catalog_images.with_options(task_runner=task_runner(config, "cuda"))(config)
    records = read_jsonl(tmp_path / "out" / "manifest.jsonl")
    assert summary.generated + summary.rejected == 16 and len({r["worker"] for r in records}) == 2
    for listed, gpus in (("0,0", ["0"]), ("0,,1", ["0"]), ("", [])):  # each once; CUDA stops at an empty entry
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
        assert visible_gpus() == gpus
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a, GPU-b")
    with pytest.raises(ClusterError, match=r"--workers 3 gives each worker a GPU of its own, but this host has 2 "
                                           r"\(GPU-a, GPU-b\)\. Use --workers 2 or fewer"):
        task_runner(config.model_copy(update={"workers": 3}), "cuda")


def test_a_killed_worker_loses_nothing(tmp_path, catalog, templates):
    from distributed import Client, LocalCluster

    out = tmp_path / "out"
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)
        config = RunConfig(catalogs=[str(catalog)], templates=templates, model="simulated:0.25", out=str(out),
                           cluster=cluster.scheduler_address, shard_size=4, batch_size=2)
        killed = []

        def kill_a_busy_worker():
            deadline = time.time() + 60
            while time.time() < deadline and not killed:
                parts = list((out / ".parts").glob("*.jsonl")) if (out / ".parts").exists() else []
                busy = [p for p in parts if 0 < len(p.read_text().splitlines()) < 4]
                for part in busy:
                    worker = read_jsonl(part)[0]["worker"]
                    names = {a: str(info["name"]) for a, info in client.scheduler_info()["workers"].items()}
                    pid = next((pid for a, pid in pids.items() if worker in (names.get(a), f"{socket.gethostname()}:{pid}")), None)
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
                        killed.append((part.name, worker))
                        return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_a_busy_worker)
        killer.start()
        summary = run_flow(config)
        killer.join()
    assert killed, f"the test did not manage to kill a worker mid-shard: {[r['worker'] for r in read_jsonl(out / 'manifest.jsonl')][:3]}"
    records = read_jsonl(out / "manifest.jsonl")
    assert len(records) == 16 and len({r["job_id"] for r in records}) == 16
    assert summary.generated + summary.rejected == 16 and summary.failed == 0
    for record in records:
        for output in record["outputs"]:
            assert sha256_file(out / output["path"]) == output["sha256"]
    assert not list(out.rglob(".zb-tmp-*"))


def test_out_of_memory_splits_the_batch_and_records_the_smaller_size(tmp_path):
    def make(j, seed, call):
        return np.random.default_rng(seed).random((256, 256, 3), dtype=np.float32)

    engine = RecordingEngine(make, max_fitting_batch=1)
    jobs = [job(seed=i) for i in range(4)]
    manifest = Manifest(tmp_path)
    result = process_shard(jobs, engine, LocalStore(tmp_path), manifest, batch_size=4)
    assert result.generated == 4
    assert [len(c) for c in engine.calls] == [4, 2, 1, 1, 2, 1, 1]
    assert {r.batch_size for r in manifest.records.values()} == {1}


def test_the_worker_preload_loads_the_pipeline_once_at_start(monkeypatch):
    from distributed import Client, LocalCluster

    monkeypatch.setenv("ZIMAGE_BATCH_MODEL", "tiny-random")
    monkeypatch.setenv("ZIMAGE_BATCH_DEVICE", "cpu")

    def loads():
        from zimage_batch.generate import pipeline_loads

        return pipeline_loads()

    with LocalCluster(n_workers=1, processes=True, threads_per_worker=1, dashboard_address="127.0.0.1:0",
                      preload=["zimage_batch.worker"]) as cluster, Client(cluster) as client:
        assert list(client.run(loads).values()) == [1]


def test_unreachable_cluster_is_a_clear_error(tmp_path, capsys, catalog, templates):
    from zimage_batch.cli import main

    code = main(["run", str(catalog), "-t", templates[0], "--model", "tiny-random", "--out", str(tmp_path / "o"),
                 "--cluster", "tcp://127.0.0.1:9", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "Dask scheduler at tcp://127.0.0.1:9 cannot be reached" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_the_command_with_workers_shares_one_prefect_server(tmp_path, catalog, templates):
    """`zimage-batch run --workers 2` as a user runs it: no PREFECT_API_URL, one embedded server for all."""
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    for name in ("PREFECT_API_URL", "PREFECT_LOGGING_LEVEL", "DASK_LOGGING__DISTRIBUTED"):  # as a user runs it
        env.pop(name, None)
    cmd = [str(Path(sys.executable).parent / "zimage-batch"), "run", str(catalog), "-t", templates[1], "--model",
           "simulated:0.05", "--workers", "2", "--shard-size", "2", "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 generated" in done.stdout and "Timed out" not in done.stderr
    assert "distributed.scheduler" not in done.stderr and "Start Nanny" not in done.stderr  # Dask's INFO lines stay quiet
    assert "Error logging to API" not in done.stderr  # Prefect's logs reached the local server before it stopped
    run = json.loads((tmp_path / "out/run.json").read_text())
    assert 1 <= run["pipeline_loads"] <= 2 and run["generated"] == 8


def test_a_cluster_run_needs_a_prefect_server_the_workers_share_and_gives_them_absolute_paths(tmp_path, catalog, templates):
    import subprocess
    import sys

    from distributed import LocalCluster

    from zimage_batch.cli import absolute_paths

    config = absolute_paths(RunConfig(catalogs=["cat.csv", "s3://bucket/c.csv"], templates=["scene.j2"], out="o",
                                      cluster="tcp://scheduler:8786", model="tiny-random"))
    assert (config.catalogs, config.templates, config.out) == ([str(tmp_path / "cat.csv"), "s3://bucket/c.csv"],
                                                               [str(tmp_path / "scene.j2")], str(tmp_path / "o"))
    assert config.model == "tiny-random"  # not a folder here: a name
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    with LocalCluster(n_workers=1, processes=False, protocol="tcp", dashboard_address="127.0.0.1:0") as cluster:
        done = subprocess.run([str(Path(sys.executable).parent / "zimage-batch"), "run", str(catalog), "-t", templates[0],
                               "--model", "simulated:0", "--cluster", cluster.scheduler_address, "--out", "o", "-q"],
                              capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 2 and "--cluster needs PREFECT_API_URL" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()


def test_records_the_workers_wrote_where_this_machine_cannot_see_stop_the_finish(tmp_path, catalog, templates):
    """Workers on other machines with an unshared --out: their records never reach this folder."""
    from zimage_batch.errors import OutputError
    from zimage_batch.run import finish_run, plan_run
    from zimage_batch.shard import ShardResult

    config = RunConfig(catalogs=[str(catalog)], templates=templates[:1], out=str(tmp_path / "o"), model="simulated:0")
    for reported in (8, 0):  # 0: the workers' own folders already held these jobs' records, so their shards made none
        plan = plan_run(config)
        with pytest.raises(OutputError, match=rf"planned 8 job\(s\) and the workers reported {reported} image\(s\), but "
                                              rf"only 0 record\(s\) are in .*Nothing was deleted"):
            finish_run(config, plan, [ShardResult(generated=reported)], "2026-11-26T00:00:00Z", time.perf_counter())
        assert not list(Path(config.out).glob(".zb-tmp-*"))  # the plan's spools


SOURCE = Path(__file__).parent.parent  # this checkout


def older_checkout(tmp_path: Path) -> Path:
    """A copy of this checkout's zimage_batch and flows with one file changed: an older commit, same version."""
    import shutil

    older = tmp_path / "older"
    for package in ("zimage_batch", "flows"):
        shutil.copytree(SOURCE / package, older / package, ignore=shutil.ignore_patterns("__pycache__"))
    (older / "zimage_batch" / "shard.py").write_text((SOURCE / "zimage_batch" / "shard.py").read_text() + "\n# older\n")
    return older


@pytest.mark.parametrize("preload, said", [
    ("import sys\nsys.modules['zimage_batch'] = None\nsys.modules['flows'] = None\n", "ModuleNotFoundError"),
    ("import zimage_batch\nzimage_batch.__version__ = '0.0.1'\n", "has zimage-batch 0.0.1 (source "),
    ("import sys\nsys.path.insert(0, OLDER)\n", "has zimage-batch 0.1.0 (source "),  # an older checkout, same version
])
def test_workers_that_cannot_run_this_version_are_named_before_any_shard(tmp_path, preload, said):
    """A worker without the package dropped its connection on the first shard and the run waited forever;
    one with other code under the same version string ran it."""
    from distributed import LocalCluster

    from zimage_batch.cluster import ClusterError, cluster_workers

    script = tmp_path / "preload.py"
    script.write_text(preload.replace("OLDER", repr(str(older_checkout(tmp_path)))) if "OLDER" in preload else preload)
    with LocalCluster(n_workers=1, processes=True, threads_per_worker=1, dashboard_address="127.0.0.1:0",
                      preload=[str(script)]) as cluster:
        with pytest.raises(ClusterError, match=r"1 of the 1 Dask worker\(s\) at .* cannot run the shards of") as caught:
            cluster_workers(cluster.scheduler_address)
    assert said in str(caught.value) and "Install the same zimage-batch on them" in str(caught.value)


def test_a_worker_whose_checkout_changed_after_it_imported_the_code_is_still_named(tmp_path):
    """What a worker runs is what it imported: updating its files without a restart does not make it current."""
    import shutil

    from distributed import LocalCluster

    from zimage_batch.cluster import ClusterError, cluster_workers

    older = older_checkout(tmp_path)
    script = tmp_path / "preload.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(older)!r})\nimport zimage_batch, flows.catalog_images\n")
    with LocalCluster(n_workers=1, processes=True, threads_per_worker=1, dashboard_address="127.0.0.1:0",
                      preload=[str(script)]) as cluster:
        shutil.copy(SOURCE / "zimage_batch" / "shard.py", older / "zimage_batch" / "shard.py")  # now the same files
        with pytest.raises(ClusterError, match=r"cannot run the shards of this machine's zimage-batch"):
            cluster_workers(cluster.scheduler_address)
    (older / "zimage_batch" / "presets.toml").write_text("")  # imported as this machine's, changed since
    script.write_text(f"import sys\nsys.path.insert(0, {str(older)!r})\nimport zimage_batch, flows.catalog_images\n"
                      f"open({str(older / 'zimage_batch' / 'presets.toml')!r}, 'w').write('# changed')\n")
    shutil.copy(SOURCE / "zimage_batch" / "presets.toml", older / "zimage_batch" / "presets.toml")
    with LocalCluster(n_workers=1, processes=True, threads_per_worker=1, dashboard_address="127.0.0.1:0",
                      preload=[str(script)]) as cluster:
        with pytest.raises(ClusterError, match=r"its files since changed to"):
            cluster_workers(cluster.scheduler_address)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_scheduler_lost_mid_run_is_a_clear_error_and_the_same_command_resumes(tmp_path):
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    from conftest import write_csv, write_template

    catalog = write_csv(tmp_path / "cat.csv", ["sku", "title"], [[f"L-{i:02d}", "mug"] for i in range(24)])
    template = write_template(tmp_path / "s.j2", "A {{ title }}", "size: 256x256\npresets: [png]")
    # as a user runs it: without the test session's Prefect level, or the Dask one an in-process CLI call set
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_LOGGING_LEVEL", "DASK_LOGGING__DISTRIBUTED")}
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    bin_ = Path(sys.executable).parent
    out = tmp_path / "out"

    def start_cluster(port: int) -> list[subprocess.Popen]:
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        return [subprocess.Popen([str(bin_ / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--dashboard-address", ":0"], **quiet),
                subprocess.Popen([str(bin_ / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "2",
                                  "--no-dashboard"], **quiet)]

    def run(port: int, **kwargs) -> subprocess.Popen:
        cmd = [str(bin_ / "zimage-batch"), "run", str(catalog), "-t", str(template), "--model", "simulated:0.3",
               "--cluster", f"tcp://127.0.0.1:{port}", "--out", str(out), "--shard-size", "4", "-q"]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)

    def wait_for_workers(port: int) -> None:
        from distributed import Client

        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            client.wait_for_workers(1, timeout=60)

    port = free_port()
    processes = start_cluster(port)
    try:
        wait_for_workers(port)
        first = run(port)
        deadline = time.monotonic() + 120
        while sum(len(p.read_text().splitlines()) for p in out.glob(".parts/*.jsonl")) < 4:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        processes[0].kill()  # the scheduler
        _, err = first.communicate(timeout=120)
        assert first.returncode == 2, err
        assert "went away during the run (scheduler-connection-lost)" in err and "run the same command again" in err
        assert "Traceback" not in err and "ERROR" not in err, err[:800]
        for process in processes:
            process.kill()
            process.wait()

        port = free_port()
        processes = start_cluster(port)
        wait_for_workers(port)
        second = run(port)
        _, err = second.communicate(timeout=180)
        assert second.returncode == 0, err
    finally:
        for process in processes:
            process.kill()
            process.wait()
    records = read_jsonl(out / "manifest.jsonl")
    assert sorted(r["sku"] for r in records) == [f"L-{i:02d}" for i in range(24)]  # each once
    assert len(list((out / "images").rglob("*.png"))) == 24 and not (out / ".parts").exists()


@pytest.mark.slow
def test_ctrl_c_stops_the_shards_on_a_clusters_workers_too(tmp_path):
    """Dask cannot stop a running task, and a cluster's workers outlive the run: without the run's stop
    file in --out they went on with their shards (14 more images in 15 s here) after the run had ended,
    and a rerun that removed the file let them go on beside it."""
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    catalog = write_csv(tmp_path / "cat.csv", ["sku", "title"], [[f"L-{i:02d}", "mug"] for i in range(24)])
    template = write_template(tmp_path / "s.j2", "A {{ title }}", "size: 256x256\npresets: [png]")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_LOGGING_LEVEL", "DASK_LOGGING__DISTRIBUTED")}
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    bin_, port, out = Path(sys.executable).parent, free_port(), tmp_path / "out"
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    processes = [subprocess.Popen([str(bin_ / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                   "--dashboard-address", ":0"], **quiet),
                 subprocess.Popen([str(bin_ / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "2",
                                   "--no-dashboard"], **quiet)]

    def images() -> int:
        return len(list(out.glob("images/*/*/*.png")))

    def run(model: str) -> subprocess.Popen:
        return subprocess.Popen([str(bin_ / "zimage-batch"), "run", str(catalog), "-t", str(template), "--model", model,
                                 "--cluster", f"tcp://127.0.0.1:{port}", "--out", str(out), "--shard-size", "8",
                                 "--batch-size", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    try:
        from distributed import Client

        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
        first = run("simulated:1")
        deadline = time.monotonic() + 120
        while images() < 1:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        at_ctrl_c = images()
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 130 and "Stopping after the batch in progress" in err, err
        at_exit = images()  # the run waited for the workers' two shards in flight: each finished its image in progress
        time.sleep(5)
        assert at_exit - at_ctrl_c <= 3 and images() == at_exit, (at_ctrl_c, at_exit, images())
        second = run("simulated:0")
        out_text, err = second.communicate(timeout=180)
        assert second.returncode == 0, err  # the stop file the first run left does not stop this one
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert sorted(r["sku"] for r in read_jsonl(out / "manifest.jsonl")) == [f"L-{i:02d}" for i in range(24)]  # each once
    assert not list(out.glob(".zb-tmp-*"))


def test_a_cluster_address_that_is_not_a_dask_scheduler_is_refused_not_waited_on():
    """The dashboard (8787) sits beside the scheduler's port (8786): a Client aimed at it waited forever."""
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from zimage_batch.cluster import ClusterError, cluster_workers

    server = ThreadingHTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(ClusterError, match=r"is not a Dask scheduler: it accepted a connection but sent nothing in 2 s"
                                               r".*not its dashboard \(8787\)"):
            cluster_workers(f"tcp://127.0.0.1:{server.server_address[1]}", timeout=4)
        assert time.monotonic() - started < 30
    finally:
        server.shutdown()
        server.server_close()


def test_workers_that_do_not_see_the_runs_out_are_named_before_any_shard(tmp_path):
    from distributed import Client, LocalCluster

    from zimage_batch.cluster import ClusterError, check_workers
    from zimage_batch.store import LOCK

    out = tmp_path / "out"
    out.mkdir()
    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        with pytest.raises(ClusterError, match=rf"1 of the 1 Dask worker\(s\) at here do not see --out {out} .*no {LOCK} there"):
            check_workers(client, "here", str(out))  # no run holds it: as a worker whose --out is another disk sees it
        (out / LOCK).touch()
        check_workers(client, "here", str(out))


@pytest.mark.slow
def test_a_terminals_ctrl_c_stops_a_run_on_local_workers(tmp_path, catalog, templates):
    """A terminal sends SIGINT to the whole process group: the local workers died of it, and the run
    waited for their shards until a second Ctrl-C."""
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_LOGGING_LEVEL"}
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    out = tmp_path / "out"
    run = subprocess.Popen([str(Path(sys.executable).parent / "zimage-batch"), "run", str(catalog), "-t", templates[0],
                            "--model", "simulated:1", "--size", "256x256", "--batch-size", "1", "--workers", "2",
                            "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("images/*/*/*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGINT)
        _, err = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 130 and "Stopping after the batch in progress" in err and "Traceback" not in err, err


def test_workers_that_do_not_answer_the_check_are_an_error_not_a_silent_wait(tmp_path):
    from distributed import LocalCluster

    from zimage_batch.cluster import ClusterError, cluster_workers

    script = tmp_path / "slow_import.py"  # a worker whose import of the flow hangs (here: 30 s)
    script.write_text(
        "import sys, time\n"
        "class Slow:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'flows.catalog_images':\n"
        "            time.sleep(30)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Slow())\n"
    )
    with LocalCluster(n_workers=1, processes=True, threads_per_worker=1, dashboard_address="127.0.0.1:0",
                      preload=[str(script)]) as cluster:
        started = time.monotonic()
        with pytest.raises(ClusterError, match=r"did not answer whether they can run .*no answer in 2 s"):
            cluster_workers(cluster.scheduler_address, check_timeout=2)
        assert time.monotonic() - started < 20


def test_a_scheduler_lost_as_a_closed_connection_reads_the_same():
    """Which error a lost scheduler surfaces as is a race: a closed comm (whose own text names internal
    objects) says what the cancelled futures say."""
    from distributed.comm import CommClosedError

    from zimage_batch.cluster import lost_scheduler

    config = RunConfig(catalogs=["c.csv"], templates=["t.j2"], out="o", cluster="tcp://127.0.0.1:1")
    lost = lost_scheduler(CommClosedError("in <TCP (closed) ConnectionPool.gather local=tcp://x>: Stream is closed"), config)
    assert "went away during the run (scheduler-connection-lost)" in str(lost) and "ConnectionPool" not in str(lost)
