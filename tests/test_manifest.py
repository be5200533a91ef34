import pyarrow.parquet as pq

from zimage_batch.manifest import MANIFEST, Attempt, Manifest, ManifestRecord, OutputFile, parquet_schema, read_jsonl
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
    with open(tmp_path / MANIFEST, "a") as f:
        f.write('{"job_id": "half-writ')
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
