import pyarrow.parquet as pq
import pytest

from zimage_batch.errors import ManifestError
from zimage_batch.manifest import (MANIFEST, Attempt, Manifest, ManifestPart, ManifestRecord, OutputFile, parquet_schema,
                                   read_jsonl, read_records)
from zimage_batch.store import LocalStore
from test_generate import job


def record(j, status="ok", outputs=()):
    return ManifestRecord.for_job(j, status=status, image_seed=j.seed, attempts=[Attempt(seed=j.seed, outcome="ok")],
                                  outputs=list(outputs), batch_size=1, device="cpu", seconds=0.1)


def test_records_carry_provenance(tmp_path):
    r = record(job())
    data = r.model_dump()
    for key in ("job_id", "sku", "row", "catalog", "template", "template_sha256", "prompt", "negative_prompt", "seed",
                "steps", "guidance_scale", "width", "height", "model", "status", "attempts", "outputs", "versions", "created_at"):
        assert key in data
    assert data["versions"]["diffusers"] and data["created_at"].endswith("Z")


def test_append_is_durable_and_torn_last_line_is_ignored(tmp_path):
    m = Manifest(tmp_path)
    m.append(record(job(seed=1)))
    m.append(record(job(seed=2)))
    m.close()
    (part,) = m.part_files()
    with open(part, "a") as f:
        f.write('{"job_id": "half-writ')  # the process was killed mid-line
    again = Manifest(tmp_path)
    assert len(again.records) == 2 and again.ignored_lines == 1


def test_a_retried_shard_appends_after_a_torn_line_without_losing_a_record(tmp_path):
    part = ManifestPart(tmp_path, "shard-000000")
    part.append(record(job(seed=1)))
    part.close()
    with open(part.path, "a") as f:
        f.write('{"job_id": "half-writ')  # the worker died mid-line; the shard is retried
    retry = ManifestPart(tmp_path, "shard-000000")
    retry.append(record(job(seed=2)))
    retry.append(record(job(seed=3)))
    retry.close()
    records, ignored = read_records(part.path)
    assert [r.seed for r in records] == [1, 2, 3] and ignored == 1


def test_a_damaged_manifest_stops_the_run_instead_of_dropping_its_records(tmp_path):
    m = Manifest(tmp_path)
    for seed in (1, 2, 3):
        m.append(record(job(seed=seed)))
    m.compact()
    lines = (tmp_path / MANIFEST).read_text().splitlines(keepends=True)
    lines[1] = lines[1][:50] + "\n"  # an edit or a bad copy, never a crash: the file is only replaced whole
    (tmp_path / MANIFEST).write_text("".join(lines))
    before = (tmp_path / MANIFEST).read_bytes()
    with pytest.raises(ManifestError, match=r"1 line\(s\) that are not manifest records \(line 2\)"):
        Manifest(tmp_path)
    assert (tmp_path / MANIFEST).read_bytes() == before
    lines[1] = lines[1][:20] + "\xff\n"  # not UTF-8 either: refused, never carried into a prompt as U+FFFD
    (tmp_path / MANIFEST).write_bytes("".join(lines).encode("utf-8").replace("\xff".encode("utf-8"), b"\xff"))
    with pytest.raises(ManifestError, match=r"\(line 2\)"):
        Manifest(tmp_path)


def test_a_manifest_whose_last_line_was_torn_by_an_old_version_still_resumes(tmp_path):
    m = Manifest(tmp_path)
    for seed in (1, 2):
        m.append(record(job(seed=seed)))
    m.compact()
    with open(tmp_path / MANIFEST, "a") as f:
        f.write('{"job_id": "half-writ')  # versions before 0.1 appended here, and could be killed mid-line
    again = Manifest(tmp_path)
    assert len(again.records) == 2 and again.ignored_lines == 1


def test_finalize_keeps_one_record_per_job_and_writes_parquet(tmp_path):
    m = Manifest(tmp_path)
    j = job()
    m.append(record(j, status="failed"))
    m.append(record(j, status="ok"))
    m.append(record(job(seed=5)))
    m.finalize()
    rows = read_jsonl(tmp_path / MANIFEST)
    assert [r["status"] for r in rows] == ["ok", "ok"] and len({r["job_id"] for r in rows}) == 2
    table = pq.read_table(tmp_path / "manifest.parquet")
    assert table.schema.equals(parquet_schema()) and table.num_rows == 2


def test_is_done_checks_presets_and_hashes(tmp_path):
    store = LocalStore(tmp_path)
    j = job(presets=("web",))
    written = store.write("images/a.jpg", b"jpeg")
    out = OutputFile(preset="web", path=written.path, sha256=written.sha256, bytes=4, width=1, height=1, format="JPEG")
    m = Manifest(tmp_path)
    assert not m.is_done(j, store)
    m.append(record(j, outputs=[out]))
    assert m.is_done(j, store)
    assert not m.is_done(job(presets=("web", "png")), store)  # a preset was added since
    (tmp_path / "images/a.jpg").write_bytes(b"JPEG")
    assert not m.is_done(j, store)
    m.append(record(j, status="failed"))
    assert not m.is_done(j, store)


# --- the schema (zimage_batch/manifest.schema.json) and the Parquet columns -------------------------

import json

import pyarrow as pa
import pytest

from zimage_batch.errors import ManifestError
from zimage_batch.manifest import SCHEMA_PATH, SCHEMA_VERSION, load_records, schema_problems

PARQUET_COLUMNS = [
    ("schema_version", pa.int64()), ("job_id", pa.string()), ("status", pa.string()), ("reasons", pa.list_(pa.string())),
    ("sku", pa.string()), ("catalog", pa.string()), ("row", pa.int64()), ("template", pa.string()),
    ("template_path", pa.string()), ("template_sha256", pa.string()), ("variant", pa.int64()), ("prompt", pa.string()),
    ("negative_prompt", pa.string()), ("seed", pa.int64()), ("image_seed", pa.int64()), ("steps", pa.int64()),
    ("guidance_scale", pa.float64()), ("width", pa.int64()), ("height", pa.int64()), ("max_sequence_length", pa.int64()),
    ("model", pa.string()), ("background", pa.string()),
    ("attempts", pa.list_(pa.struct([("seed", pa.int64()), ("outcome", pa.string())]))),
    ("outputs", pa.list_(pa.struct([("preset", pa.string()), ("path", pa.string()), ("sha256", pa.string()),
                                    ("bytes", pa.int64()), ("width", pa.int32()), ("height", pa.int32()),
                                    ("format", pa.string()), ("uri", pa.string()), ("etag", pa.string()),
                                    ("checksum_crc32", pa.string()), ("mtime_ns", pa.int64())]))),
    ("batch_size", pa.int64()), ("device", pa.string()), ("precision", pa.string()), ("worker", pa.string()), ("seconds", pa.float64()),
    ("versions", pa.map_(pa.string(), pa.string())), ("created_at", pa.string()),
    ("delivery", pa.string()), ("delivery_error", pa.string()), ("c2pa_signer", pa.string()), ("current", pa.bool_()),
]

# A record as schema version 1 wrote it (before 'background'), from a run of the core pipeline.
V1_LINE = json.dumps({
    "schema_version": 1, "job_id": "3c320cdafc983beadb64a60a", "status": "ok", "reasons": [], "sku": "BTL-001",
    "catalog": "demo.csv", "row": 1, "template": "lifestyle_scene", "template_path": "templates/lifestyle_scene.j2",
    "template_sha256": "9f2c", "variant": 1, "prompt": "A navy bottle on a desk", "negative_prompt": "", "seed": 3918,
    "image_seed": 3918, "steps": 8, "guidance_scale": 0.0, "width": 256, "height": 256, "max_sequence_length": 512,
    "model": "tiny-random/v1", "attempts": [{"seed": 3918, "outcome": "ok"}],
    "outputs": [{"preset": "web", "path": "images/BTL-001/lifestyle_scene/BTL-001_v1_3c320cdafc98_web.jpg",
                 "sha256": "ab" * 32, "bytes": 5120, "width": 256, "height": 256, "format": "JPEG"}],
    "batch_size": 4, "device": "cpu", "seconds": 0.41, "versions": {"torch": "2.13.0", "zimage-batch": "0.1.0"},
    "created_at": "2026-11-20T10:00:00.000Z",
})


def test_parquet_columns_are_pinned():
    assert [(f.name, f.type) for f in parquet_schema()] == PARQUET_COLUMNS


def test_schema_describes_exactly_the_record_fields():
    schema = json.loads(SCHEMA_PATH.read_text())
    assert set(schema["properties"]) == set(ManifestRecord.model_fields)
    assert set(schema["required"]) == set(ManifestRecord.model_fields) - {"background", "worker", "delivery", "delivery_error",
                                                                        "precision", "c2pa_signer"}
    assert schema["properties"]["schema_version"]["enum"] == list(range(1, SCHEMA_VERSION + 1)) and SCHEMA_VERSION == 5
    outputs = schema["properties"]["outputs"]["items"]
    assert set(outputs["properties"]) == set(OutputFile.model_fields)
    assert set(outputs["required"]) == set(OutputFile.model_fields) - {"uri", "etag", "checksum_crc32", "mtime_ns"}


def test_new_records_follow_the_schema_and_carry_background():
    data = json.loads(record(job(background="white")).model_dump_json())
    assert schema_problems(data) == [] and data["schema_version"] == 5 and data["background"] == "white"
    del data["background"]
    assert schema_problems(data) == ["'background' is a required property"]


def test_a_v1_record_still_loads(tmp_path):
    assert schema_problems(json.loads(V1_LINE)) == []
    old = load_records(V1_LINE + "\n", "old/manifest.jsonl")["3c320cdafc983beadb64a60a"]
    assert old.schema_version == 1 and old.background is None and old.outputs[0].preset == "web"
    (tmp_path / MANIFEST).write_text(V1_LINE + "\n")
    m = Manifest(tmp_path)  # a resumed run over an old folder keeps it, and rewrites the Parquet with nulls
    assert m.ignored_lines == 0 and m.records[old.job_id].schema_version == 1
    m.finalize()
    assert pq.read_table(tmp_path / "manifest.parquet").column("background").to_pylist() == [None]


def test_a_manifest_that_breaks_the_schema_is_refused_with_every_line_named():
    good = record(job()).model_dump_json()
    bad_hash = json.loads(good)
    bad_hash["outputs"] = [{"preset": "web", "path": "a.jpg", "sha256": "xyz", "bytes": 1, "width": 1, "height": 1, "format": "JPEG"}]
    no_seed = json.loads(good)
    del no_seed["seed"]
    text = "\n".join([good, json.dumps(bad_hash), json.dumps(no_seed), '{"job_id": "torn'])
    with pytest.raises(ManifestError) as err:
        load_records(text, "out/manifest.jsonl")
    message = str(err.value)
    assert "out/manifest.jsonl does not follow the manifest schema" in message and "in 3 line(s)" in message
    assert "line 2: outputs/0/sha256: 'xyz' does not match" in message
    assert "line 3: 'seed' is a required property" in message and "line 4: not JSON" in message


def test_append_refuses_a_record_that_breaks_the_schema(tmp_path):
    bad = record(job(), outputs=[OutputFile(preset="web", path="a.jpg", sha256="not-a-hash", bytes=1, width=1, height=1,
                                            format="JPEG")])
    with pytest.raises(ValueError, match="does not follow manifest.schema.json"):
        Manifest(tmp_path).append(bad)
    assert not (tmp_path / MANIFEST).exists() or (tmp_path / MANIFEST).read_text() == ""


def test_is_done_trusts_size_and_mtime_and_verify_hashes(tmp_path, monkeypatch):
    import os

    from zimage_batch import store as store_module

    store = LocalStore(tmp_path)
    j = job(presets=("web",))
    written = store.write("images/a.jpg", b"jpeg")
    assert written.mtime_ns == (tmp_path / "images/a.jpg").stat().st_mtime_ns
    out = OutputFile(preset="web", path=written.path, sha256=written.sha256, bytes=4, width=1, height=1, format="JPEG",
                     mtime_ns=written.mtime_ns)
    m = Manifest(tmp_path)
    m.append(record(j, outputs=[out]))
    hashed = []
    monkeypatch.setattr(store_module, "sha256_file", lambda p: hashed.append(p) or "x")
    assert m.is_done(j, store) and hashed == []  # size and mtime as recorded: no read at all
    assert not m.is_done(j, store, verify=True) and len(hashed) == 1  # --verify-files always hashes
    monkeypatch.undo()
    path = tmp_path / "images/a.jpg"
    path.write_bytes(b"JPEG")  # same size, new content, new mtime: hashed, caught
    assert not m.is_done(j, store)
    os.utime(path, ns=(written.mtime_ns, written.mtime_ns))  # content forged with the old mtime: only --verify-files sees it
    assert m.is_done(j, store) and not m.is_done(j, store, verify=True)
    path.write_bytes(b"jpeg")  # right content, other mtime (a copy): hashed, accepted
    assert m.is_done(j, store)


def test_the_wheel_ships_the_schema_and_presets(tmp_path):
    """An installed (non-editable) package finds its schema and presets without the repository."""
    import shutil
    import subprocess
    import sys
    import zipfile

    from conftest import ROOT

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("zimage_batch", "flows"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("zimage_batch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"zimage_batch/manifest.schema.json", "zimage_batch/presets.toml"} <= set(names)
    assert SCHEMA_PATH.parent.name == "zimage_batch"  # read beside the code, not from a repository root
