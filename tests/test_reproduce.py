"""reproduce: regenerate a job from its manifest record alone; byte-identical on the CPU with tiny-random."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import write_csv, write_template
from zimage_batch.cli import main
from zimage_batch.generate import load_engine
from zimage_batch.manifest import MANIFEST, Manifest, read_jsonl
from zimage_batch.plan import Job, check_inputs, plan_jobs
from zimage_batch.postprocess import PRESETS
from zimage_batch.reproduce import hash_distance, psnr
from zimage_batch.shard import process_shard
from zimage_batch.store import LocalStore


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real run of the tiny pipeline: 3 rows x (scene: web JPEG + PNG; white: rejected, noise) in batches of 2."""
    folder = tmp_path_factory.mktemp("reproduce")
    catalog = write_csv(folder / "c.csv", ["sku", "title"], [["A-1", "Steel bottle"], ["B-2", "咖啡杯"], ["C-3", "Runner"]])
    scene = write_template(folder / "scene.j2", "A {{ title }} in a sunny kitchen", "size: 256x256\npresets: [web, png]")
    white = write_template(folder / "white.j2", "A {{ title }} on white", "size: 256x256\npresets: [amazon_main]\nbackground: white")
    inputs = check_inputs([str(catalog)], [str(scene), str(white)], "tiny-random", PRESETS)
    jobs = [j for j in plan_jobs(inputs) if isinstance(j, Job)]
    out = folder / "out"
    manifest = Manifest(out)
    process_shard(jobs, load_engine("tiny-random", "cpu"), LocalStore(out), manifest, batch_size=2)
    manifest.finalize()
    return out


def copy_run(tiny_run: Path, tmp_path: Path) -> tuple[Path, list[dict]]:
    out = tmp_path / "out"
    shutil.copytree(tiny_run, out)
    return out, read_jsonl(out / MANIFEST)


def reproduce_cli(capsys, *args):
    code = main(["reproduce", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("status", ["ok", "rejected"])
def test_reproduction_is_byte_identical_from_the_record_alone(tiny_run, tmp_path, capsys, status):
    out, records = copy_run(tiny_run, tmp_path)
    record = next(r for r in records if r["status"] == status and r["batch_size"] == 2)
    shutil.rmtree(out / "images"), shutil.rmtree(out / "rejected")  # nothing but the manifest is left
    repro = tmp_path / "repro"
    code, stdout, _ = reproduce_cli(capsys, out, "--job", record["job_id"][:12], "--out", repro)
    assert code == 0, stdout
    assert f"Reproduced job {record['job_id']} with model tiny-random on cpu (recorded: tiny-random/v1 on cpu), batch of 2" in stdout
    assert stdout.count(": byte-identical") == len(record["outputs"]) and "BYTE-IDENTICAL" in stdout
    assert "Same versions and device as the recorded run." in stdout
    for output in record["outputs"]:
        assert hashlib.sha256((repro / output["path"]).read_bytes()).hexdigest() == output["sha256"]
    report = json.loads((repro / "reproduce.json").read_text())
    assert report["byte_identical"] is True and report["job_id"] == record["job_id"]


def test_a_changed_record_reports_how_far_and_which_versions_differ(tiny_run, tmp_path, capsys, monkeypatch):
    out, records = copy_run(tiny_run, tmp_path)
    record = next(r for r in records if r["status"] == "ok")
    record["steps"] = 4  # as if the run had used other settings than the record says
    record["versions"]["torch"] = "2.11.0+cu128"
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in records))
    code, stdout, _ = reproduce_cli(capsys, out, "--job", record["job_id"], "--out", tmp_path / "repro")
    assert code == 1 and "DIFFERENT: 2 output(s)" in stdout
    for line in [line for line in stdout.splitlines() if line.startswith("  ")]:
        assert ": differs: PSNR " in line and " dB, perceptual hash distance " in line
    assert "torch 2.11.0+cu128 (recorded) vs " in stdout


@pytest.mark.parametrize("case, code, phrase", [
    ("unknown job", 2, "Job id 'feedfacefeed' is not in"),
    ("failed job", 2, "failed in its run (black image on all 3 attempts); it has no image to reproduce"),
    ("local model", 3, "made with a local model folder (local:zimage@0123abcd4567); its path is not in the manifest"),
    ("out inside run", 2, "is inside the run's folder"),
    ("invalid manifest", 2, "does not follow the manifest schema"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(tiny_run, tmp_path, capsys, case, code, phrase):
    out, records = copy_run(tiny_run, tmp_path)
    job_id, repro = records[0]["job_id"], tmp_path / "repro"
    if case == "unknown job":
        job_id = "feedfacefeed"
    elif case == "failed job":
        records[0].update(status="failed", reasons=["black image on all 3 attempts"], image_seed=None, outputs=[])
    elif case == "local model":
        records[0]["model"] = "local:zimage@0123abcd4567"
    elif case == "out inside run":
        repro = out / "repro"
    else:
        records[0]["seed"] = -1
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in records))
    before = sorted(p for p in out.rglob("*"))
    got, stdout, stderr = reproduce_cli(capsys, out, "--job", job_id, "--out", repro)
    assert got == code and stdout == "" and stderr.startswith("error: ") and "Traceback" not in stderr
    assert phrase in stderr, stderr
    assert not repro.exists() and sorted(p for p in out.rglob("*")) == before


def test_psnr_and_perceptual_hash_distance():
    rng = np.random.default_rng(0)
    a = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    noisy = np.clip(a.astype(int) + rng.integers(-3, 4, a.shape), 0, 255).astype(np.uint8)
    assert psnr(a, a) == float("inf") and hash_distance(a, a) == 0
    assert 35 < psnr(a, noisy) < 50 and hash_distance(a, noisy) <= 6
    assert hash_distance(a, a[:, ::-1].copy()) > 10  # a mirrored image is a different picture


def test_an_int8_run_records_its_precision_and_reproduces_with_it(tmp_path, capfd):
    catalog = write_csv(tmp_path / "c.csv", ["sku", "title"], [["A-1", "Steel bottle"]])
    scene = write_template(tmp_path / "scene.j2", "A {{ title }} in a sunny kitchen", "size: 256x256\npresets: [png]")
    out = tmp_path / "out"
    code = main(["run", str(catalog), "-t", str(scene), "--out", str(out), "--model", "tiny-random", "--device", "cpu",
                 "--vram", "12", "-q"])
    err = capfd.readouterr().err
    assert code == 0 and err == "", err  # quiet: no torchao or torch notices either
    (record,) = read_jsonl(out / MANIFEST)
    assert record["precision"] == "fp32+int8-weights" and record["schema_version"] == 5
    code, stdout, _ = reproduce_cli(capfd, out, "--job", record["job_id"], "--out", tmp_path / "repro")
    assert code == 0 and ": byte-identical" in stdout and "precision" not in stdout  # the recorded precision was used


def paint_red(path: Path) -> None:
    from PIL import Image, ImageDraw

    image = Image.open(path).convert("RGB")
    ImageDraw.Draw(image).rectangle([0, 0, 100, 100], fill="red")
    image.save(path, quality=90)


def test_an_altered_or_missing_original_is_named_not_called_byte_identical(tiny_run, tmp_path, capsys):
    out, records = copy_run(tiny_run, tmp_path)
    record = next(r for r in records if r["status"] == "ok" and len(r["outputs"]) == 2)
    web, png = (next(o["path"] for o in record["outputs"] if o["preset"] == p) for p in ("web", "png"))
    paint_red(out / web)
    (out / png).unlink()
    code, stdout, _ = reproduce_cli(capsys, out, "--job", record["job_id"], "--out", tmp_path / "repro")
    assert code == 1, stdout
    assert f"{web}: matches the manifest's SHA-256, but the file in the run's folder no longer does: it was altered" in stdout
    assert f"{png}: byte-identical to the manifest's SHA-256 (the original is not in the run's folder to compare)" in stdout
    assert "BYTE-IDENTICAL" not in stdout and "ORIGINAL ALTERED: 2 output(s) match the manifest's SHA-256, but 1 file(s)" in stdout
    assert json.loads((tmp_path / "repro/reproduce.json").read_text())["outputs"][0]["original"] == "altered"
    # Only missing: the reproduction still matches the record, and the verdict says what it was compared with.
    shutil.copyfile(tiny_run / web, out / web)
    code, stdout, _ = reproduce_cli(capsys, out, "--job", record["job_id"], "--out", tmp_path / "repro2")
    assert code == 0 and f"{web}: byte-identical\n" in stdout
    assert ("BYTE-IDENTICAL: 2 output(s), to the manifest's SHA-256 only: 1 original(s) not in the run's folder to "
            "compare;") in stdout


@pytest.mark.parametrize("mark", [MANIFEST, ".zimage-batch.lock", ".parts"])
def test_out_that_is_another_run_folder_is_refused(tiny_run, tmp_path, capsys, mark):
    out, records = copy_run(tiny_run, tmp_path)
    other = tmp_path / "backup"
    other.mkdir()
    (other / mark).mkdir() if mark == ".parts" else (other / mark).write_text("")
    code, stdout, stderr = reproduce_cli(capsys, out, "--job", records[0]["job_id"], "--out", other)
    assert code == 2 and stdout == "" and "Traceback" not in stderr
    assert stderr.startswith(f"error: --out {other} is the folder of a run (it holds {mark})")
    assert sorted(p.name for p in other.iterdir()) == [mark]


def test_files_in_out_are_never_overwritten_with_other_bytes(tiny_run, tmp_path, capsys):
    out, records = copy_run(tiny_run, tmp_path)
    record = next(r for r in records if r["status"] == "ok")
    repro = tmp_path / "repro"
    code, _, _ = reproduce_cli(capsys, out, "--job", record["job_id"], "--out", repro)
    assert code == 0
    code, stdout, _ = reproduce_cli(capsys, out, "--job", record["job_id"], "--out", repro)  # the same bytes: fine
    assert code == 0 and "BYTE-IDENTICAL" in stdout
    path = repro / record["outputs"][0]["path"]
    path.write_bytes(b"someone else's file")
    code, stdout, stderr = reproduce_cli(capsys, out, "--job", record["job_id"], "--out", repro)
    assert code == 2 and stdout == "" and "Traceback" not in stderr
    assert f"already holds {record['outputs'][0]['path']} (1 file(s) in all) with other bytes" in stderr
    assert path.read_bytes() == b"someone else's file"


def test_a_record_whose_paths_do_not_follow_from_it_says_what_was_written(tiny_run, tmp_path, capsys):
    out, records = copy_run(tiny_run, tmp_path)
    record = next(r for r in records if r["status"] == "ok")
    record["sku"] = "../../../escaped"
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in records))
    code, stdout, _ = reproduce_cli(capsys, out, "--job", record["job_id"], "--out", tmp_path / "repro")
    assert code == 1 and "came out ok" not in stdout
    lines = [line for line in stdout.splitlines() if line.startswith("  ")]
    assert len(lines) == 2 and all(": differs (the reproduction wrote images/escaped-" in line
                                   and ", not the recorded path: the record's path does not follow from its sku" in line
                                   for line in lines), stdout


def test_a_simulated_run_reproduces_without_naming_the_model(tmp_path, capsys):
    catalog = write_csv(tmp_path / "c.csv", ["sku", "title"], [["A-1", "Steel bottle"]])
    scene = write_template(tmp_path / "scene.j2", "A {{ title }} in a sunny kitchen", "size: 256x256\npresets: [web]")
    out = tmp_path / "out"
    assert main(["run", str(catalog), "-t", str(scene), "--out", str(out), "--model", "simulated:0.01", "-q"]) == 0
    (record,) = read_jsonl(out / MANIFEST)
    assert record["model"] == "simulated/v1"
    code, stdout, stderr = reproduce_cli(capsys, out, "--job", record["job_id"], "--out", tmp_path / "repro")
    assert code == 0 and "with model simulated:0 on cpu (recorded: simulated/v1 on cpu)" in stdout, stderr
    assert ": byte-identical" in stdout and "BYTE-IDENTICAL: 1 output(s);" in stdout
