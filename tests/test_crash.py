"""Crash safety: `kill -9` a real `zimage-batch run` at several points, rerun the same command, and
check it completes: every job exactly once in the manifest, no temp or half-written file, and
nothing that was already delivered (recorded) made again.

Kills come from outside (SIGKILL once some records are durable) and from crash points inside the
run (``zimage_batch.crashpoints``: the process SIGKILLs itself between two exact steps).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, write_csv, write_template
from zimage_batch.manifest import Manifest, read_jsonl
from zimage_batch.store import sha256_file

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
CLI = str(Path(sys.executable).parent / "zimage-batch")


@pytest.fixture
def command(tmp_path):
    rows = [[f"K-{i:02d}", f"Thing {i}", ("red", "blue", "green")[i % 3], ("mug", "lamp")[i % 2]] for i in range(10)]
    catalog = write_csv(tmp_path / "cat.csv", ["sku", "title", "color", "kind"], rows)
    scene = write_template(tmp_path / "scene.j2", "A {{ color }} {{ kind }}: {{ title }}", "size: 256x256\npresets: [web]")
    white = write_template(tmp_path / "white.j2", "A {{ color }} {{ kind }} on white",
                           "size: 256x256\npresets: [web, png]\nbackground: white")

    def make(model: str, *templates: Path) -> list[str]:
        flags = [a for t in templates or (scene, white) for a in ("-t", str(t))]
        return [CLI, "run", str(catalog), *flags, "--out", str(tmp_path / "out"), "--model", model,
                "--shard-size", "4", "--batch-size", "2", "--device", "cpu", "-q"]

    make.scene = scene
    return make


def environment(tmp_path, crash_at: str | None = None) -> dict:
    from prefect.settings import PREFECT_API_URL

    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "TMPDIR": str(tmp_path / "tmp")}
    env.pop("ZIMAGE_BATCH_CRASH_AT", None)
    if crash_at:
        env["ZIMAGE_BATCH_CRASH_AT"] = crash_at
    return env


def start(cmd, env) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> tuple[str, str]:
    """Wait for the run (ten minutes at most), then make sure nothing it started lives on."""
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return out, err


def durable_files(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file that a durable manifest record (manifest.jsonl or a part) vouches for."""
    found = {}
    for record in Manifest(out).records.values():
        for o in record.outputs:
            path = out / o.path
            if path.is_file() and sha256_file(path) == o.sha256:
                stat = path.stat()
                found[o.path] = (stat.st_ino, stat.st_mtime_ns)
    return found


def crash(cmd, env, out: Path, when_records: int | None = None) -> dict[str, tuple[int, int]]:
    """Run until killed: by its crash point, or from here once ``when_records`` records are durable."""
    proc = start(cmd, env)
    try:
        while when_records is not None and proc.poll() is None:
            parts = list((out / ".parts").glob("*.jsonl")) if (out / ".parts").is_dir() else []
            if sum(len(p.read_bytes().splitlines()) for p in parts) >= when_records:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        _, err = stop(proc)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed (exit {proc.returncode}): {err[-3000:]}"
    return durable_files(out)


def check_complete(out: Path, planned: int, delivered_before: dict[str, tuple[int, int]]) -> None:
    records = read_jsonl(out / "manifest.jsonl")
    ids = [r["job_id"] for r in records]
    assert len(ids) == len(set(ids)) == planned  # every job exactly once
    assert {r["status"] for r in records} == {"ok"}
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    images = {f for f in files if f.startswith(("images/", "rejected/"))}
    recorded = {o["path"]: o["sha256"] for r in records for o in r["outputs"]}
    assert images == set(recorded)  # no orphan, no half-written file
    assert all(sha256_file(out / path) == sha for path, sha in recorded.items())
    assert not [f for f in files if ".zb-tmp-" in f or f.startswith(".parts")]
    assert files - images == {"manifest.jsonl", "manifest.parquet", "run.json", "report.html"}
    for path, identity in delivered_before.items():  # delivered before a crash: never made again
        stat = (out / path).stat()
        assert (stat.st_ino, stat.st_mtime_ns) == identity, f"{path} was written again after the crash"


def test_killed_at_any_point_a_rerun_completes_exactly_once(tmp_path, command):
    out = tmp_path / "out"
    delivered: dict[str, tuple[int, int]] = {}
    # simulated:0.2 sleeps 0.2 s per image, so the outside kill lands mid-generation
    sim = command("simulated:0.2")
    delivered.update(crash(sim, environment(tmp_path, "planned:1"), out))  # early: planned, nothing made
    assert not (out / "images").exists()
    delivered.update(crash(sim, environment(tmp_path), out, when_records=3))  # mid-generation, from outside
    assert 3 <= len(Manifest(out).records) < 20
    delivered.update(crash(sim, environment(tmp_path, "store.before_rename:3"), out))  # an image half-stored
    delivered.update(crash(sim, environment(tmp_path, "store.after_rename:4"), out))  # stored, not yet recorded
    before_finish = len(Manifest(out).records)
    # finishing: manifest.jsonl folded from the parts, the parts not yet deleted
    delivered.update(crash(sim, environment(tmp_path, "manifest.compacted:2"), out))
    assert len(Manifest(out).records) == 20 > before_finish
    proc = start(sim, environment(tmp_path))
    stdout, stderr = stop(proc)
    assert proc.returncode == 0, stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert (run["planned"], run["generated"], run["skipped"]) == (20, 0, 20)
    check_complete(out, 20, delivered)
    assert not [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("zimage-batch")]  # nothing left elsewhere


def test_a_killed_tiny_random_run_resumes(tmp_path, command):
    out = tmp_path / "out"
    tiny = [*command("tiny-random", command.scene), "--limit", "6"]  # scene only: noise passes no white check
    delivered = crash(tiny, environment(tmp_path), out, when_records=2)
    proc = start(tiny, environment(tmp_path))
    _, stderr = stop(proc)
    assert proc.returncode == 0, stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["skipped"] >= 2 and run["generated"] + run["skipped"] == 6
    check_complete(out, 6, delivered)


def test_temp_files_a_killed_worker_left_are_gone_when_the_run_finishes(tmp_path, command):
    """A Dask worker killed mid-write leaves a temp file; its shard reruns elsewhere and the run finishes."""
    from zimage_batch import run
    from zimage_batch.manifest import utc_now

    catalog, templates = command("simulated:0")[2], [command.scene]
    config = run.RunConfig(catalogs=[catalog], templates=[str(t) for t in templates], out=str(tmp_path / "out"),
                           model="simulated:0", device="cpu")
    plan = run.plan_run(config)
    shard = next(run.read_shards(plan, 64))
    results = [run.run_shard(config, 0, shard)]
    left = tmp_path / "out/images/K-00/scene/.zb-tmp-killed"  # as a worker killed before its rename leaves it
    left.write_bytes(b"half an image")
    run.finish_run(config, plan, results, utc_now(), time.perf_counter())
    assert not left.exists() and not list((tmp_path / "out").rglob(".zb-tmp-*"))
    check_complete(tmp_path / "out", 10, {})


def session_processes(session: int) -> list[int]:
    """Live (not zombie) processes of a session: everything a run started stays in its session."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        state, _ppid, _group, sid = stat[stat.rindex(")") + 2 :].split()[:4]
        if int(sid) == session and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc (Linux)")
def test_a_killed_run_leaves_no_embedded_prefect_server_behind(tmp_path, command):
    env = environment(tmp_path, crash_at="planned")
    del env["PREFECT_API_URL"]  # no Prefect server configured: the run starts its own
    proc = start(command("simulated:0.01"), env)
    try:
        proc.wait(timeout=300)
        deadline = time.monotonic() + 20
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.25)
        left = session_processes(proc.pid)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left holds the output pipes open
        except ProcessLookupError:
            pass
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err
    assert left == []  # the server (and anything else the run started) is gone


def test_a_second_run_into_the_same_folder_stops_and_the_first_finishes_intact(tmp_path, command):
    out, sim = tmp_path / "out", command("simulated:0.2")
    first = start(sim, environment(tmp_path))
    try:
        while first.poll() is None and not (out / ".parts").is_dir():  # the first run is making images
            time.sleep(0.02)
        second = subprocess.run(sim, env=environment(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        stdout, stderr = stop(first)
    assert first.returncode == 0, stderr[-3000:]
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"is in use by another zimage-batch run (pid {first.pid}" in second.stderr
    check_complete(out, 20, {})


def test_killed_after_delivering_a_rerun_from_a_fresh_out_adopts_what_landed(tmp_path, command, s3):
    """A run delivering to S3 is killed after some jobs' images and sidecars landed, before their records
    were journaled there. A rerun from an empty --out (a new container) adopts those jobs from their
    sidecars instead of generating them again (on other hardware the new bytes would be a conflict)."""
    dest = f"s3://{s3.bucket}/nightly"
    sim = [*command("simulated:0.05", command.scene), "--dest", dest]
    crash(sim, environment(tmp_path, "deliver.sidecars:3"), tmp_path / "out")
    landed = {k for k in s3.keys("nightly/images/") if k.endswith(".json")}
    assert len(landed) >= 3 and not s3.keys("nightly/manifest.jsonl")

    fresh = [*sim[: sim.index("--out") + 1], str(tmp_path / "fresh"), *sim[sim.index("--out") + 2 :]]
    proc = start(fresh, environment(tmp_path))
    stdout, stderr = stop(proc)
    assert proc.returncode == 0, stderr[-3000:]
    run = json.loads((tmp_path / "fresh/run.json").read_text())
    assert run["recovered"] == len(landed) and f"Recovered: {len(landed)} job(s)" in stdout
    assert (run["generated"], run["delivered"], run["delivery_conflicts"]) == (10 - len(landed), 10 - len(landed), 0)
    remote = [json.loads(line) for line in s3.read("nightly/manifest.jsonl").decode().splitlines()]
    assert len(remote) == len({r["job_id"] for r in remote}) == 10 and {r["delivery"] for r in remote} == {"delivered"}
    assert not s3.keys("nightly/manifest.parts/")  # markers and journal parts all absorbed


def test_killed_while_planning_uploads_earlier_images_a_fresh_out_adopts_them(tmp_path, command, s3):
    """A run without --dest, then one with it: planning uploads the finished images (no generation). Killed
    there, a rerun from an empty --out adopts what landed, as it does for a shard's uploads."""
    dest = f"s3://{s3.bucket}/later"
    local = command("simulated:0", command.scene)
    proc = start(local, environment(tmp_path))
    _, stderr = stop(proc)
    assert proc.returncode == 0, stderr[-3000:]
    crash([*local, "--dest", dest], environment(tmp_path, "deliver.sidecars:3"), tmp_path / "out")
    landed = {k for k in s3.keys("later/images/") if k.endswith(".json")}
    assert len(landed) >= 3 and [k for k in s3.keys("later/manifest.parts/") if k.endswith(".open")]

    fresh = [*local[: local.index("--out") + 1], str(tmp_path / "fresh"), *local[local.index("--out") + 2 :], "--dest", dest]
    proc = start(fresh, environment(tmp_path))
    _, stderr = stop(proc)
    assert proc.returncode == 0, stderr[-3000:]
    run = json.loads((tmp_path / "fresh/run.json").read_text())
    assert (run["recovered"], run["generated"], run["delivery_conflicts"]) == (len(landed), 10 - len(landed), 0)
    assert not s3.keys("later/manifest.parts/")
