"""Delivery to S3, against a real SeaweedFS started by the tests (it checks signatures and checksums)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import S3_SECRET_KEY, write_csv, write_template
from s3server import FaultProxy, free_port
from test_generate import job
from zimage_batch import deliver
from zimage_batch.deliver import IMMUTABLE, METADATA_LIMIT, S3Destination, Uploader, connect, object_metadata
from zimage_batch.errors import DeliveryError
from zimage_batch.manifest import Attempt, ManifestRecord, OutputFile, read_jsonl
from zimage_batch.shard import output_name
from zimage_batch.store import LocalStore

PREFIX = "catalog/2026-11-26"


def make_record(root: Path, seed: int = 1, sizes: dict[str, int] | None = None) -> ManifestRecord:
    """An "ok" record whose files exist under ``root``, with random bytes of the given sizes per preset."""
    sizes = sizes or {"web": 30_000, "png": 50_000}
    j = job(seed=seed, sku=f"SKU-{seed}", presets=tuple(sizes))
    rng = np.random.default_rng(seed)
    outputs = []
    for preset, size in sizes.items():
        written = LocalStore(root).write(f"images/{j.sku}/t/{output_name(j, preset)}.jpg", rng.bytes(size))
        outputs.append(OutputFile(preset=preset, path=written.path, sha256=written.sha256, bytes=written.bytes,
                                  width=8, height=8, format="JPEG"))
    return ManifestRecord.for_job(j, status="ok", image_seed=j.seed, attempts=[Attempt(seed=j.seed, outcome="ok")],
                                  outputs=outputs, batch_size=1, device="cpu", seconds=0.1)


def deliver_all(uploader: Uploader, records: list[ManifestRecord]) -> dict[str, ManifestRecord]:
    results: dict[str, ManifestRecord] = {}
    uploader.on_result = lambda r: results.__setitem__(r.job_id, r)
    for record in records:
        uploader.submit(record)
    uploader.drain()
    uploader.close()
    return results


def count_puts(client) -> Counter:
    """Per key: PutObject calls the client makes, and the HTTP status S3 finally answered each with."""
    seen: Counter = Counter()

    def before(params, context, **_):
        context["zb-key"] = params["Key"]
        seen[("sent", params["Key"])] += 1

    def after(http_response, context, **_):
        seen[(http_response.status_code, context["zb-key"])] += 1

    client.meta.events.register("before-parameter-build.s3.PutObject", before)
    client.meta.events.register("after-call.s3.PutObject", after)
    return seen


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.mark.parametrize("uri, bucket, prefix", [
    ("s3://assets-bucket/catalog/2026-11-26", "assets-bucket", "catalog/2026-11-26"),
    ("s3://assets-bucket/catalog/", "assets-bucket", "catalog"),
    ("s3://assets-bucket", "assets-bucket", ""),
])
def test_destination_uris_parse(uri, bucket, prefix):
    dest = S3Destination.parse(uri)
    assert (dest.bucket, dest.prefix) == (bucket, prefix)
    assert dest.uri("images/a.jpg") == f"s3://{bucket}/{prefix + '/' if prefix else ''}images/a.jpg"


@pytest.mark.parametrize("uri, phrase", [
    ("assets-bucket/catalog", "is not an S3 URI"), ("s3://", "not a valid bucket name"), ("s3://ab/x", "not a valid bucket name"),
    ("s3://Assets_Bucket/x", "not a valid bucket name"), ("s3://bucket/a//b", "empty, '.' or '..' part"),
    ("s3://bucket/a/../b", "empty, '.' or '..' part"),
])
def test_bad_destination_uris_say_what_would_work(uri, phrase):
    with pytest.raises(DeliveryError, match="s3://BUCKET/PREFIX") as err:
        S3Destination.parse(uri)
    assert phrase in str(err.value)


def test_user_metadata_stays_within_the_aws_limit(tmp_path):
    record = make_record(tmp_path).model_copy(update={"job_id": "x" * 500, "image_seed": 2**32 - 1})
    metadata = object_metadata(record, record.outputs[0])
    assert set(metadata) >= {"job-id", "seed", "sha256"}
    assert sum(len(k) + len(v) for k, v in metadata.items()) <= METADATA_LIMIT
    assert all(v.isascii() for v in metadata.values())  # HTTP headers: no sku or prompt in there


def test_images_land_with_type_cache_metadata_checksum_and_a_sidecar(s3, tmp_path):
    record = make_record(tmp_path)
    dest = S3Destination(s3.bucket, PREFIX)
    results = deliver_all(Uploader(dest, connect(), tmp_path), [record])
    delivered = results[record.job_id]
    assert delivered.delivery == "delivered" and delivered.delivery_error is None
    for local, out in zip(record.outputs, delivered.outputs):
        key = f"{PREFIX}/{local.path}"
        data = (tmp_path / local.path).read_bytes()
        head = s3.client.head_object(Bucket=s3.bucket, Key=key, ChecksumMode="ENABLED")
        assert head["ContentType"] == "image/jpeg" and head["CacheControl"] == IMMUTABLE
        assert head["Metadata"] == {"job-id": record.job_id, "seed": str(record.image_seed), "sha256": local.sha256,
                                    "preset": local.preset, "generator": "zimage-batch"}
        assert hashlib.sha256(s3.read(key)).hexdigest() == local.sha256
        crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
        assert out.uri == f"s3://{s3.bucket}/{key}" and out.etag == head["ETag"] == f'"{md5_hex(data)}"'
        assert out.checksum_crc32 == head["ChecksumCRC32"] == crc
        sidecar = ManifestRecord.model_validate_json(s3.read(key + ".json"))
        assert sidecar == delivered and sidecar.prompt == record.prompt
        assert s3.client.head_object(Bucket=s3.bucket, Key=key + ".json")["ContentType"] == "application/json"


def test_a_dead_run_is_resumable_from_the_journal_parts(s3, tmp_path):
    records = [make_record(tmp_path, seed) for seed in range(3)]
    dest = S3Destination(s3.bucket, PREFIX)
    deliver_all(Uploader(dest, connect(), tmp_path, journal_every=2), records)  # no publish(): the run "died"
    assert len(s3.keys(f"{PREFIX}/manifest.parts/")) == 2 and not s3.keys(f"{PREFIX}/manifest.jsonl")
    other = Uploader(dest, connect(), tmp_path / "elsewhere")
    remote = other.read_records()
    assert set(remote) == {r.job_id for r in records} and {r.delivery for r in remote.values()} == {"delivered"}
    assert all(deliver.is_delivered(remote[r.job_id], job(seed=r.seed, presets=("web", "png")), dest) for r in records)
    other.publish(remote.values(), b"{}")
    assert not s3.keys(f"{PREFIX}/manifest.parts/")  # absorbed into manifest.jsonl
    assert {r["job_id"] for r in read_jsonl_bytes(s3.read(f"{PREFIX}/manifest.jsonl"))} == set(remote)
    other.close()


def test_what_a_dead_shard_delivered_but_never_journaled_is_adopted_from_its_sidecars(s3, tmp_path, monkeypatch):
    from zimage_batch.shard import image_prefix

    records = [make_record(tmp_path, seed) for seed in range(3)]
    never_made = job(seed=9, sku="SKU-9", presets=("web",))
    dest = S3Destination(s3.bucket, PREFIX)
    dying = Uploader(dest, connect(), tmp_path)  # journals every 64 records: none before it "dies"
    dying.begin({**{r.job_id: image_prefix(job(seed=r.seed, sku=r.sku, presets=("web", "png"))) for r in records},
                 never_made.job_id: image_prefix(never_made)})
    for record in records:
        dying.submit(record)
    dying.close()  # the uploads under way finish; no drain: no journal part, the marker stays
    assert [k.rsplit("/", 1)[1].endswith(".open") for k in s3.keys(f"{PREFIX}/manifest.parts/")] == [True]

    fresh = Uploader(dest, connect(), tmp_path / "fresh-out")
    assert fresh.read_records() == {}
    assert fresh.recover() == 3
    assert {r.job_id: r.delivery for r in fresh.remote.values()} == {r.job_id: "delivered" for r in records}
    parts = s3.keys(f"{PREFIX}/manifest.parts/")
    # the adopted records, journaled; the marker stays: it names a job never delivered, so its shard may still run
    assert sorted(p.rsplit(".", 1)[1] for p in parts) == ["jsonl", "open"]
    later = Uploader(dest, connect(), tmp_path / "later")
    assert set(later.read_records()) == {r.job_id for r in records} and later.recover() == 0
    monkeypatch.setattr(deliver, "MARKER_TTL", -1)  # a day later: the marker is a dead shard's
    last = Uploader(dest, connect(), tmp_path / "last")
    last.read_records()
    assert last.recover() == 0 and [p.rsplit(".", 1)[1] for p in s3.keys(f"{PREFIX}/manifest.parts/")] == ["jsonl"]
    for uploader in (fresh, later, last):
        uploader.close()


def test_a_shard_that_finishes_removes_its_marker(s3, tmp_path):
    record = make_record(tmp_path)
    uploader = Uploader(S3Destination(s3.bucket, PREFIX), connect(), tmp_path)
    uploader.begin({record.job_id: "images/SKU-1/t/SKU-1_v0_"})
    deliver_all(uploader, [record])
    assert [k for k in s3.keys(f"{PREFIX}/manifest.parts/") if k.endswith(".open")] == []


def read_jsonl_bytes(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def test_big_files_go_multipart_with_a_full_object_crc32_and_stay_create_only(s3, tmp_path):
    mib = 1024 * 1024
    record = make_record(tmp_path, sizes={"png": 11 * mib})
    dest = S3Destination(s3.bucket, PREFIX)
    first = deliver_all(Uploader(dest, connect(), tmp_path, multipart_threshold=5 * mib), [record])[record.job_id]
    key = f"{PREFIX}/{record.outputs[0].path}"
    head = s3.client.head_object(Bucket=s3.bucket, Key=key, ChecksumMode="ENABLED")
    assert first.delivery == "delivered" and head["ETag"].endswith('-3"') and head.get("ChecksumType") == "FULL_OBJECT"
    assert hashlib.sha256(s3.read(key)).hexdigest() == record.outputs[0].sha256
    assert first.outputs[0].checksum_crc32 == head["ChecksumCRC32"]
    # The same bytes again: accepted as delivered (If-None-Match on completion), nothing rewritten.
    again = deliver_all(Uploader(dest, connect(), tmp_path, multipart_threshold=5 * mib), [record])[record.job_id]
    assert again.delivery == "delivered"
    assert s3.client.head_object(Bucket=s3.bucket, Key=key)["LastModified"] == head["LastModified"]
    # Other bytes under the same key: a conflict, and the object keeps its content.
    other = tmp_path / "other"
    written = LocalStore(other).write(record.outputs[0].path, np.random.default_rng(9).bytes(6 * mib))
    changed = record.model_copy(update={"outputs": [record.outputs[0].model_copy(update={"sha256": written.sha256, "bytes": written.bytes})]})
    conflict = deliver_all(Uploader(dest, connect(), other, multipart_threshold=5 * mib), [changed])[changed.job_id]
    assert conflict.delivery == "conflict", conflict.delivery_error
    assert hashlib.sha256(s3.read(key)).hexdigest() == record.outputs[0].sha256
    assert not s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads")  # aborted, not left behind


def test_our_own_object_from_an_earlier_try_is_accepted_without_rewriting_it(s3, tmp_path):
    record = make_record(tmp_path)
    dest = S3Destination(s3.bucket, PREFIX)
    deliver_all(Uploader(dest, connect(), tmp_path), [record])
    key = f"{PREFIX}/{record.outputs[0].path}"
    before = s3.client.head_object(Bucket=s3.bucket, Key=key)["LastModified"]
    client = connect()
    puts = count_puts(client)
    result = deliver_all(Uploader(dest, client, tmp_path), [record])[record.job_id]  # knows nothing of the first run
    assert result.delivery == "delivered" and result.outputs[0].etag
    assert s3.client.head_object(Bucket=s3.bucket, Key=key)["LastModified"] == before
    assert puts[("sent", key)] == 1 and puts[(412, key)] == 1  # one PUT, answered 412, then a HEAD that matched


def test_other_content_at_our_key_is_a_conflict_and_is_never_overwritten(s3, tmp_path):
    record = make_record(tmp_path)
    key = f"{PREFIX}/{record.outputs[0].path}"
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=b"someone else's picture")
    results = deliver_all(Uploader(S3Destination(s3.bucket, PREFIX), connect(), tmp_path), [record])
    result = results[record.job_id]
    assert result.delivery == "conflict"
    assert f"s3://{s3.bucket}/{key} already exists with other content" in result.delivery_error
    assert "not overwritten" in result.delivery_error
    assert s3.read(key) == b"someone else's picture"
    assert not s3.keys(key + ".json")  # no sidecar for a job that did not land


def test_a_file_changed_after_generation_is_not_delivered(s3, tmp_path):
    record = make_record(tmp_path)
    (tmp_path / record.outputs[1].path).write_bytes(b"edited by hand")
    result = deliver_all(Uploader(S3Destination(s3.bucket, PREFIX), connect(), tmp_path), [record])[record.job_id]
    assert result.delivery == "failed" and "changed since it was generated" in result.delivery_error
    assert not s3.keys(f"{PREFIX}/{record.outputs[1].path}")


def test_resets_mid_request_and_mid_response_lose_and_duplicate_nothing(s3, tmp_path, monkeypatch):
    """A proxy resets a third of the connections: before the server has the body, or after it stored it."""
    records = [make_record(tmp_path, seed) for seed in range(10)]
    dest = S3Destination(s3.bucket, PREFIX)
    with FaultProxy(s3.server.port, fraction=0.3, max_faults=16, seed=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        client = connect()
        # One request per connection, so the proxy's per-connection dice fall on every request.
        client.meta.events.register("before-sign.s3", lambda request, **_: request.headers.__setitem__("Connection", "close"))
        puts = count_puts(client)
        results = deliver_all(Uploader(dest, client, tmp_path, journal_every=100), records)
    assert proxy.faults["request"] >= 2 and proxy.faults["response"] >= 2, proxy.faulted
    assert {r.delivery for r in results.values()} == {"delivered"}, [r.delivery_error for r in results.values()]
    expected = sorted([f"{PREFIX}/{o.path}" for r in records for o in r.outputs] + [f"{PREFIX}/{o.path}.json" for r in records for o in r.outputs])
    assert [k for k in s3.keys(PREFIX) if "/manifest.parts/" not in k] == expected  # nothing missing, nothing extra
    for record in records:
        for out in results[record.job_id].outputs:
            body = s3.read(f"{PREFIX}/{out.path}")
            assert hashlib.sha256(body).hexdigest() == out.sha256 and len(body) == out.bytes
            assert out.etag == s3.client.head_object(Bucket=s3.bucket, Key=f"{PREFIX}/{out.path}")["ETag"]
    stored = Counter({key: n for (status, key), n in puts.items() if status == 200})
    assert max(stored.values()) == 1  # S3 never acknowledged a key twice ...
    assert any(status == 412 for status, _ in puts)  # ... and a retry after a lost answer met If-None-Match


@pytest.mark.parametrize("resets, outcome", [(2, "delivered"), (3, "failed")])
def test_our_own_bounded_retry_outlasts_botocores(resets, outcome, s3, tmp_path, monkeypatch):
    record = make_record(tmp_path, sizes={"web": 30_000})
    with FaultProxy(s3.server.port, script=("request",) * resets) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        uploader = Uploader(S3Destination(s3.bucket, PREFIX), connect(attempts=1), tmp_path, attempts=3)
        result = deliver_all(uploader, [record])[record.job_id]
    assert proxy.faults["request"] == resets and result.delivery == outcome, result.delivery_error
    key = f"{PREFIX}/{record.outputs[0].path}"
    if outcome == "failed":
        assert "not acknowledged after 3 tries (ConnectionClosedError)" in result.delivery_error and not s3.keys(PREFIX)
    else:
        assert hashlib.sha256(s3.read(key)).hexdigest() == record.outputs[0].sha256


def test_a_body_corrupted_in_flight_is_refused_by_the_server_and_sent_again(s3, tmp_path, monkeypatch):
    record = make_record(tmp_path, sizes={"web": 30_000})
    with FaultProxy(s3.server.port, script=("corrupt",)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        client = connect()
        puts = count_puts(client)
        result = deliver_all(Uploader(S3Destination(s3.bucket, PREFIX), client, tmp_path), [record])[record.job_id]
    key = f"{PREFIX}/{record.outputs[0].path}"
    assert [fault for fault, _ in proxy.faulted] == ["corrupt"] and puts[(400, key)] == 1  # the server said no
    assert result.delivery == "delivered" and hashlib.sha256(s3.read(key)).hexdigest() == record.outputs[0].sha256


def test_a_destination_that_goes_down_fails_fast_and_says_where(s3, tmp_path, monkeypatch):
    records = [make_record(tmp_path, seed) for seed in range(8)]
    with FaultProxy(s3.server.port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        uploader = Uploader(S3Destination(s3.bucket, PREFIX), connect(attempts=2), tmp_path, workers=2, attempts=2)
        uploader.check()
        proxy.down = True
        results = deliver_all(uploader, records)
    assert {r.delivery for r in results.values()} == {"failed"} and uploader.report.failed == 8
    assert sum("not tried" in r.delivery_error for r in results.values()) >= 4  # the breaker spared the rest
    assert not s3.keys(PREFIX)
    paragraphs = [p for p in uploader.report.problems if p.startswith("Cannot deliver")]
    assert len(paragraphs) == 1 and f"s3://{s3.bucket}/{PREFIX} (endpoint {proxy.endpoint}): could not reach" in paragraphs[0]
    assert len(uploader.report.problems) <= 1 + 3 + 1  # the paragraph, the jobs that tripped it, one more in flight


WRONG_SETUPS = {
    "missing bucket": (lambda s3: {"bucket": "no-such-bucket"}, ["bucket 'no-such-bucket' does not exist", "Create it"]),
    "wrong secret": (lambda s3: {"env": {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}}, ["rejected the credentials", "AWS_SECRET_ACCESS_KEY"]),
    "unknown access key": (lambda s3: {"env": {"AWS_ACCESS_KEY_ID": "nobody"}}, ["rejected the credentials", "AWS_ACCESS_KEY_ID"]),
    "no credentials": (lambda s3: {"env": {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}}, ["no AWS credentials were found", "AWS_PROFILE"]),
    "unreachable endpoint": (lambda s3: {"env": {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}}, ["could not reach the endpoint", "AWS_ENDPOINT_URL"]),
}


@pytest.mark.parametrize("case", list(WRONG_SETUPS))
def test_a_wrong_destination_fails_before_anything_with_one_clear_paragraph(case, s3, monkeypatch):
    change, phrases = WRONG_SETUPS[case]
    setup = change(s3)
    for name, value in setup.get("env", {}).items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    bucket = setup.get("bucket", s3.bucket)
    with pytest.raises(DeliveryError) as err:
        deliver.check(f"s3://{bucket}/{PREFIX}")
    message = str(err.value)
    endpoint = setup.get("env", {}).get("AWS_ENDPOINT_URL") or s3.server.endpoint
    assert message.startswith(f"Cannot deliver to s3://{bucket}/{PREFIX} (endpoint {endpoint}): ")
    assert "\n" not in message and "Nothing was generated." in message and S3_SECRET_KEY not in message
    for phrase in phrases:
        assert phrase in message


# --- the whole run, through the Prefect flow ------------------------------------------------------------------


def run_flow(config):
    from flows.catalog_images import catalog_images

    return catalog_images(config)


@pytest.fixture
def dest_config(tmp_path, small_catalog, scene_template, s3):
    from zimage_batch.run import RunConfig

    return RunConfig(catalogs=[str(small_catalog)], templates=[str(scene_template)], out=str(tmp_path / "out"),
                     model="tiny-random", device="cpu", batch_size=2, shard_size=2, dest=f"s3://{s3.bucket}/{PREFIX}")


@pytest.fixture
def puts(monkeypatch):
    """Keys of every PutObject the run's clients send."""
    sent: list[str] = []
    real = deliver.connect

    def counting_connect(**kw):
        client = real(**kw)
        client.meta.events.register("provide-client-params.s3.PutObject", lambda params, **_: sent.append(params["Key"]))
        return client

    monkeypatch.setattr(deliver, "connect", counting_connect)
    return sent


@pytest.mark.usefixtures("prefect_server")
def test_a_run_delivers_every_image_and_publishes_its_manifest(dest_config, s3, puts):
    summary = run_flow(dest_config)
    out = Path(dest_config.out)
    assert summary.exit_code == 0, summary.delivery_problems
    assert (summary.generated, summary.delivered, summary.uploaded_files) == (3, 3, 3)
    assert summary.manifest_uri == f"s3://{s3.bucket}/{PREFIX}/manifest.jsonl"
    remote = read_jsonl_bytes(s3.read(f"{PREFIX}/manifest.jsonl"))
    assert len(remote) == 3 and {r["delivery"] for r in remote} == {"delivered"}
    assert json.loads(s3.read(f"{PREFIX}/run.json")) == json.loads((out / "run.json").read_text())
    local = {r["job_id"]: r for r in read_jsonl(out / "manifest.jsonl")}
    for record in remote:
        assert record == local[record["job_id"]]
        for o in record["outputs"]:
            key = f"{PREFIX}/{o['path']}"
            assert o["uri"] == f"s3://{s3.bucket}/{key}" and o["etag"] and o["checksum_crc32"]
            assert s3.read(key) == (out / o["path"]).read_bytes()
            assert json.loads(s3.read(key + ".json"))["job_id"] == record["job_id"]
    assert not s3.keys(f"{PREFIX}/manifest.parts/")
    import pyarrow.parquet as pq

    def rows(source) -> list[dict]:
        return sorted(pq.read_table(source).to_pylist(), key=lambda row: row["job_id"])

    assert rows(io.BytesIO(s3.read(f"{PREFIX}/manifest.parquet"))) == rows(out / "manifest.parquet")  # one run, one --out
    # 3 images, 3 sidecars, an in-flight marker and a journal part per shard (2), manifest.jsonl and .parquet, run.json, report.html
    assert len(puts) == 3 + 3 + 2 + 2 + 4


@pytest.mark.usefixtures("prefect_server")
def test_a_rerun_uploads_nothing_that_is_there(dest_config, s3, puts):
    run_flow(dest_config)
    before = {k: s3.client.head_object(Bucket=s3.bucket, Key=k)["LastModified"] for k in s3.keys(f"{PREFIX}/images/")}
    puts.clear()
    summary = run_flow(dest_config)
    assert (summary.generated, summary.skipped, summary.delivered, summary.exit_code) == (0, 3, 0, 0)
    assert sorted(puts) == [f"{PREFIX}/{name}" for name in ("manifest.jsonl", "manifest.parquet", "report.html", "run.json")]  # no image
    assert {k: s3.client.head_object(Bucket=s3.bucket, Key=k)["LastModified"] for k in s3.keys(f"{PREFIX}/images/")} == before


@pytest.mark.usefixtures("prefect_server")
def test_a_failed_upload_phase_is_delivered_by_the_rerun_without_regenerating(dest_config, s3, monkeypatch):
    from zimage_batch import progress

    with FaultProxy(s3.server.port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)

        def bucket_goes_down(event, value):
            if event == "planned":
                proxy.down = True

        with progress.listening(bucket_goes_down):
            first = run_flow(dest_config)
        assert (first.generated, first.delivered, first.delivery_failed, first.exit_code) == (3, 0, 3, 1)
        assert first.manifest_uri is None and any("not published" in p for p in first.delivery_problems)
        assert not s3.keys(PREFIX)
        assert len(list(Path(dest_config.out, "images").rglob("*.jpg"))) == 3  # local outputs stay
        proxy.down = False
        second = run_flow(dest_config)
    assert (second.generated, second.pipeline_loads, second.delivered, second.exit_code) == (0, 0, 3, 0)
    assert {r["delivery"] for r in read_jsonl_bytes(s3.read(f"{PREFIX}/manifest.jsonl"))} == {"delivered"}


@pytest.mark.usefixtures("prefect_server")
def test_a_fresh_out_on_another_machine_resumes_from_the_destination(dest_config, s3, puts, tmp_path):
    first = run_flow(dest_config.model_copy(update={"limit": 1}))
    assert first.delivered == 1
    done_key = [k for k in s3.keys(f"{PREFIX}/images/") if not k.endswith(".json")]
    puts.clear()
    second = run_flow(dest_config.model_copy(update={"out": str(tmp_path / "machine-b")}))
    assert (second.generated, second.skipped, second.delivered, second.exit_code) == (2, 1, 2, 0)
    assert not set(done_key) & set(puts)  # the first machine's image was neither regenerated nor uploaded
    assert len(read_jsonl_bytes(s3.read(f"{PREFIX}/manifest.jsonl"))) == 3


@pytest.mark.usefixtures("prefect_server")
def test_the_destination_says_which_images_are_current(dest_config, s3, small_catalog, tmp_path):
    """A shop that syncs from the bucket reads manifest.parquet there: records only the destination
    holds (another machine's) are flagged by the run's plan, and a partial run keeps the flags."""
    import pyarrow.parquet as pq

    def flags() -> list[tuple[str, str, bool | None]]:
        table = pq.read_table(io.BytesIO(s3.read(f"{PREFIX}/manifest.parquet")), columns=["sku", "prompt", "current"])
        return sorted((r["sku"], r["prompt"].split(" called ")[1], r["current"]) for r in table.to_pylist())

    run_flow(dest_config)
    assert flags() == [("A-1", "Steel bottle in a sunny kitchen.", True), ("B/2", "咖啡杯 in a sunny kitchen.", True),
                       ("C 3", "Runner in a sunny kitchen.", True)]
    write_csv(small_catalog, ["sku", "title", "color", "kind", "material", "price"],  # A-1 renamed, C 3 gone
              [["A-1", "Steel bottle XL", "navy", "bottle", "steel", "10"], ["B/2", "咖啡杯", "white", "mug", "ceramic", "12"]])
    other_machine = run_flow(dest_config.model_copy(update={"out": str(tmp_path / "machine-b")}))
    assert (other_machine.generated, other_machine.skipped) == (1, 1)
    today = [("A-1", "Steel bottle XL in a sunny kitchen.", True), ("A-1", "Steel bottle in a sunny kitchen.", False),
             ("B/2", "咖啡杯 in a sunny kitchen.", True), ("C 3", "Runner in a sunny kitchen.", False)]
    assert flags() == today  # the old A-1 and C 3 records are only in the bucket (the first --out made them)
    partial = run_flow(dest_config.model_copy(update={"limit": 1}))  # the first --out, which last saw yesterday's catalog
    assert partial.exit_code == 0 and flags() == today


@pytest.fixture
def all_logs():
    """Every log record of every logger, at DEBUG (botocore's wire-level logging included), as text."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))  # a formatted handler: Prefect's setup leaves root alone
    root = logging.getLogger()
    old_level, old_handlers = root.level, root.handlers[:]
    root.handlers[:] = [handler]  # only ours: others (Prefect's console) may hold streams of earlier tests
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.handlers[:] = old_handlers
        root.setLevel(old_level)


@pytest.mark.usefixtures("prefect_server")
def test_no_secret_in_any_log_line_manifest_report_or_error(dest_config, s3, all_logs, capsys, monkeypatch):
    from zimage_batch.cli import main

    summary = run_flow(dest_config)
    assert summary.delivered == 3
    out = Path(dest_config.out)
    texts = [p.read_text(errors="replace") for p in out.rglob("*") if p.suffix in (".json", ".jsonl")]
    texts += [s3.read(k).decode(errors="replace") for k in s3.keys(PREFIX) if k.endswith((".json", ".jsonl"))]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    code = main(["run", *dest_config.catalogs, "-t", dest_config.templates[0], "--model", "tiny-random", "--device", "cpu",
                 "--out", str(out / "again"), "--dest", dest_config.dest, "-q"])
    captured = capsys.readouterr()
    assert code == DeliveryError.exit_code and captured.err.startswith("error: Cannot deliver to")
    assert "Traceback" not in captured.err and not (out / "again").exists()
    logs = all_logs.getvalue()
    assert "PutObject" in logs and "InvalidAccessKeyId" in logs  # we did read the wire-level logs
    assert len(texts) == 2 + 5  # local manifest.jsonl + run.json; remote 3 sidecars + manifest.jsonl + run.json
    for text in [*texts, logs, captured.out, captured.err]:
        assert S3_SECRET_KEY not in text


@pytest.mark.usefixtures("prefect_server")
def test_verify_checks_a_delivered_prefix_and_names_what_is_wrong(dest_config, s3, capsys):
    from zimage_batch.cli import main

    run_flow(dest_config)
    target = f"s3://{s3.bucket}/{PREFIX}"
    assert main(["verify", target]) == 0, capsys.readouterr().out
    assert "OK: 3 file(s) of 3 manifest record(s)" in capsys.readouterr().out
    remote = read_jsonl_bytes(s3.read(f"{PREFIX}/manifest.jsonl"))
    altered, deleted = (f"{PREFIX}/{r['outputs'][0]['path']}" for r in remote[:2])
    data = bytearray(s3.read(altered))
    data[len(data) // 2] ^= 0xFF
    s3.client.put_object(Bucket=s3.bucket, Key=altered, Body=bytes(data))
    s3.client.delete_object(Bucket=s3.bucket, Key=deleted)
    s3.client.put_object(Bucket=s3.bucket, Key=f"{PREFIX}/images/stray.jpg", Body=b"not ours")
    assert main(["verify", target]) == 1
    out = capsys.readouterr().out
    assert altered.split("/", 2)[2] in out and deleted.split("/", 2)[2] in out and "images/stray.jpg" in out
    assert "ALTERED" in out and "MISSING" in out and "STRAY" in out
    assert f"{deleted.split('/', 2)[2]}.json" not in out  # the sidecar of a listed file is the delivery's, not a stray
    s3.client.put_object(Bucket=s3.bucket, Key=f"{PREFIX}/images/notes.json", Body=b"{}")
    assert main(["verify", target]) == 1
    assert "STRAY      images/notes.json: not in the manifest" in capsys.readouterr().out

    s3.client.put_object(Bucket=s3.bucket, Key=f"{PREFIX}/manifest.parts/run-000000.open", Body=b"{}")
    assert main(["verify", target]) == 2  # a delivery still running, or stopped before it published
    err = capsys.readouterr().err
    assert "holds manifest parts of a run that has not finished (manifest.parts/run-000000.open" in err


@pytest.mark.usefixtures("prefect_server")
def test_verify_of_a_delivery_with_rejected_jobs_expects_only_the_delivered_files(dest_config, tmp_path, s3, capsys):
    from zimage_batch.cli import main

    white = write_template(tmp_path / "white.j2", "A {{ color }} {{ kind }} on white.", "size: 256x256\npresets: [amazon_main]")
    summary = run_flow(dest_config.model_copy(update={"templates": [*dest_config.templates, str(white)]}))
    assert (summary.generated, summary.rejected) == (3, 3)  # tiny-random's noise has no white backdrop
    assert main(["verify", f"s3://{s3.bucket}/{PREFIX}"]) == 0, capsys.readouterr().out
    assert "OK: 3 file(s) of 6 manifest record(s)" in capsys.readouterr().out


def test_verify_of_a_missing_bucket_is_one_clear_paragraph(s3, capsys):
    from zimage_batch.cli import main

    code = main(["verify", "s3://no-such-bucket-zb/run"])
    err = capsys.readouterr().err
    assert code == 4 and "no-such-bucket-zb" in err and "Traceback" not in err


def test_catalogs_are_read_from_s3_in_blocks(s3):
    """CSV and Parquet catalogs straight from a bucket give the same rows as the local files."""
    from conftest import CATALOGS
    import io

    from zimage_batch.catalog import Catalog, _LineReader
    from zimage_batch.errors import CatalogError

    for name in ("demo.csv", "demo.parquet"):
        s3.client.put_object(Bucket=s3.bucket, Key=f"catalogs/{name}", Body=(CATALOGS / name).read_bytes())
        remote = Catalog(f"s3://{s3.bucket}/catalogs/{name}")
        local = Catalog(CATALOGS / name)
        assert remote.columns == local.columns
        assert [(r.row, r.values) for r in remote.rows()] == [(r.row, r.values) for r in local.rows()]
    data = (CATALOGS / "demo.csv").read_bytes()
    assert list(_LineReader(io.BytesIO(data), block=7)) == data.splitlines(keepends=True)  # lines across blocks
    with pytest.raises(CatalogError, match="does not exist"):
        Catalog(f"s3://{s3.bucket}/catalogs/missing.csv")


def test_plan_reads_an_s3_catalog(s3, capsys):
    from conftest import CATALOGS, TEMPLATES
    from zimage_batch.cli import main

    s3.client.put_object(Bucket=s3.bucket, Key="products.parquet", Body=(CATALOGS / "demo.parquet").read_bytes())
    code = main(["plan", f"s3://{s3.bucket}/products.parquet", "-t", str(TEMPLATES / "poster_text.j2"), "--model", "tiny-random"])
    assert code == 0 and "14 jobs from 14 rows" in capsys.readouterr().out


@pytest.mark.usefixtures("prefect_server")
def test_the_report_is_delivered_and_the_prefect_note_links_it_presigned(dest_config, s3):
    import re
    import urllib.request

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.artifacts import REPORT_KEY

    run_flow(dest_config)
    local = (Path(dest_config.out) / "report.html").read_bytes()
    assert s3.read(f"{PREFIX}/report.html") == local
    with get_client(sync_client=True) as client:
        notes = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[REPORT_KEY])))
    note = max(notes, key=lambda a: a.created).data
    links = dict(re.findall(r"\[(report\.html|manifest\.jsonl|run\.json)\]\((http[^)]+)\)", note))
    assert set(links) == {"report.html", "manifest.jsonl", "run.json"} and "X-Amz-Signature" in links["report.html"]
    assert S3_SECRET_KEY not in note
    with urllib.request.urlopen(links["report.html"], timeout=10) as response:
        assert response.read() == local


def test_two_runs_publishing_at_once_lose_no_line(s3, tmp_path):
    """Both read the destination's manifest, then both write it: the second write finds it changed
    (If-Match), reads the first one's records, merges them and writes again."""
    dest = S3Destination(s3.bucket, PREFIX)
    first, second = (Uploader(dest, connect(), tmp_path / name) for name in ("a", "b"))
    a_records = [make_record(tmp_path / "a", seed) for seed in (1, 2)]
    b_records = [make_record(tmp_path / "b", seed) for seed in (3, 4)]
    deliver_all(first, a_records[:1])  # a journal part, read by both
    for uploader in (first, second):
        uploader.read_records()
    first.publish(a_records, b"{}")
    second.publish(b_records, b"{}")
    published = {r["job_id"] for r in read_jsonl_bytes(s3.read(f"{PREFIX}/manifest.jsonl"))}
    assert published == {r.job_id for r in a_records + b_records}
    assert not s3.keys(f"{PREFIX}/manifest.parts/")
    third = Uploader(dest, connect(), tmp_path / "c")
    third.publish([make_record(tmp_path / "c", 5)], b"{}")  # never read: If-None-Match fails, it reads and merges
    assert len(read_jsonl_bytes(s3.read(f"{PREFIX}/manifest.jsonl"))) == 5


def all_current(records: list[ManifestRecord], before: dict) -> bytes:
    """What a run passes to ``publish`` for manifest.parquet, with every record current."""
    from zimage_batch.manifest import to_parquet_bytes

    return to_parquet_bytes(records, {r.job_id: True for r in records})


def parquet_rows(s3) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(s3.read(f"{PREFIX}/manifest.parquet")), columns=["job_id", "current"]).to_pylist()


def two_runs(s3, tmp_path) -> tuple[Uploader, Uploader, list[ManifestRecord], list[ManifestRecord]]:
    """Two runs' uploaders to one prefix, both having read it, and two records of each to publish."""
    dest = S3Destination(s3.bucket, PREFIX)
    a, b = (Uploader(dest, connect(), tmp_path / name) for name in ("a", "b"))
    for uploader in (a, b):
        uploader.read_records()
    return a, b, [make_record(tmp_path / "a", seed) for seed in (1, 2)], [make_record(tmp_path / "b", seed) for seed in (3, 4)]


def test_a_run_publishing_between_anothers_two_writes_is_in_its_parquet_too(s3, tmp_path):
    """B publishes whole between A's manifest.jsonl and A's manifest.parquet: A's parquet write finds
    the parquet changed (If-Match), and A reads, merges and writes both again."""
    a, b, a_records, b_records = two_runs(s3, tmp_path)
    interrupted = []

    def a_parquet(records, before):
        if not interrupted:
            interrupted.append(len(records))
            b.publish(b_records, b"{}", None, all_current)
        return all_current(records, before)

    a.publish(a_records, b"{}", None, a_parquet)
    everyone = {r.job_id for r in a_records + b_records}
    assert interrupted == [2] and {r["job_id"] for r in read_jsonl_bytes(s3.read(f"{PREFIX}/manifest.jsonl"))} == everyone
    assert {r["job_id"] for r in parquet_rows(s3)} == everyone and not a.problems


def test_a_run_publishing_right_after_anothers_manifest_write_is_in_its_parquet_too(s3, tmp_path):
    """B publishes whole just after A wrote manifest.jsonl, before A writes manifest.parquet: A's
    parquet was read before its manifest.jsonl write, so its write finds the parquet changed."""
    a, b, a_records, b_records = two_runs(s3, tmp_path)
    put_replacing, interleaved = a._put_replacing, []

    def then_b(name, *args):
        put_replacing(name, *args)
        if name == "manifest.jsonl" and not interleaved:
            interleaved.append(name)
            b.publish(b_records, b"{}", None, all_current)

    a._put_replacing = then_b
    a.publish(a_records, b"{}", None, all_current)
    everyone = {r.job_id for r in a_records + b_records}
    assert interleaved and {r["job_id"] for r in read_jsonl_bytes(s3.read(f"{PREFIX}/manifest.jsonl"))} == everyone
    assert {r["job_id"] for r in parquet_rows(s3)} == everyone


def test_a_damaged_parquet_at_the_destination_is_rewritten_and_said(s3, tmp_path):
    s3.client.put_object(Bucket=s3.bucket, Key=f"{PREFIX}/manifest.parquet", Body=b"not parquet")
    uploader = Uploader(S3Destination(s3.bucket, PREFIX), connect(), tmp_path)
    uploader.read_records()
    seen = []
    uploader.publish([make_record(tmp_path, 1)], b"{}", None, lambda records, before: seen.append(before) or all_current(records, before))
    assert seen == [{}] and [r["current"] for r in parquet_rows(s3)] == [True]
    assert len(uploader.problems) == 1 and "could not be read as a manifest.parquet" in uploader.problems[0]


@pytest.mark.usefixtures("prefect_server")
def test_delivered_jobs_keep_their_signing_and_the_run_says_so(dest_config, s3, certificates):
    run_flow(dest_config)
    keys = {k: s3.client.head_object(Bucket=s3.bucket, Key=k)["LastModified"] for k in s3.keys(f"{PREFIX}/images/")}
    signed = dest_config.model_copy(update={"c2pa_cert": str(certificates["chain"]), "c2pa_key": str(certificates["key"])})
    summary = run_flow(signed)
    assert (summary.generated, summary.skipped, summary.kept_signature, summary.delivery_conflicts) == (0, 3, 3, 0)
    assert {k: s3.client.head_object(Bucket=s3.bucket, Key=k)["LastModified"] for k in s3.keys(f"{PREFIX}/images/")} == keys


class _Raw:
    """The body of a canned S3 response, as botocore reads it."""

    def __init__(self, data: bytes):
        self.data = data

    def stream(self, **_):
        yield self.data


@pytest.mark.parametrize("status, code, written", [(501, "NotImplemented", "unconditional"), (409, "ConditionalRequestConflict", "merged")])
def test_publish_on_servers_without_if_match_and_on_a_conditional_race(s3, tmp_path, status, code, written):
    """A server without If-Match (501) gets the manifest written as before; a 409 race is read and merged like a 412."""
    from botocore.awsrequest import AWSResponse

    dest = S3Destination(s3.bucket, PREFIX)
    first = Uploader(dest, connect(), tmp_path / "a")
    first.publish([make_record(tmp_path / "a", 1)], b"{}")
    client = connect()
    refused = []

    def refuse_conditional(request, **_):
        if "If-Match" in request.headers and not refused:
            refused.append(request.url)
            body = f"<Error><Code>{code}</Code><Message>no</Message></Error>".encode()
            return AWSResponse(request.url, status, {"Content-Type": "application/xml"}, _Raw(body))
        return None

    client.meta.events.register("before-send.s3.PutObject", refuse_conditional)
    second = Uploader(dest, client, tmp_path / "b", attempts=1)
    second.read_records()
    second.publish([make_record(tmp_path / "b", 2)], b"{}")
    assert refused and len(read_jsonl_bytes(s3.read(f"{PREFIX}/manifest.jsonl"))) == 2
    assert second.unconditional == (written == "unconditional")
    for uploader in (first, second):
        uploader.close()


def test_a_retried_shard_uploads_what_its_dead_attempt_made_but_did_not_deliver(dest_config, s3):
    """A worker died after making a shard's images, before their uploads: the retried shard skipped the jobs
    as done and nothing uploaded them in that run (the run still exited 0)."""
    from zimage_batch.plan import plan_jobs
    from zimage_batch.run import check_run, run_shard

    config = dest_config.model_copy(update={"model": "simulated:0"})
    jobs = [j for j in plan_jobs(check_run(config))]
    first = run_shard(config.model_copy(update={"dest": None}), 0, jobs)  # the attempt that "died" before uploading
    assert first.generated == 3 and not s3.keys(f"{PREFIX}/images/")
    retried = run_shard(config, 0, jobs)
    assert (retried.generated, retried.delivery.delivered, retried.delivery.conflicts) == (0, 3, 0)
    assert len([k for k in s3.keys(f"{PREFIX}/images/") if not k.endswith(".json")]) == 3
    assert not [k for k in s3.keys(f"{PREFIX}/manifest.parts/") if k.endswith(".open")]


def test_records_this_version_cannot_read_are_written_back_not_dropped(s3, tmp_path):
    """A newer zimage-batch publishing to the same prefix writes records this one cannot validate."""
    newer = json.loads(make_record(tmp_path / "n", 7).model_dump_json())
    newer.update(schema_version=99, a_future_field="x")
    unreadable = {**newer, "job_id": "from-a-newer-version", "status": "superseded"}  # fails validation here
    s3.client.put_object(Bucket=s3.bucket, Key=f"{PREFIX}/manifest.jsonl",
                         Body=(json.dumps(newer) + "\n" + json.dumps(unreadable) + "\n{torn").encode())
    uploader = Uploader(S3Destination(s3.bucket, PREFIX), connect(), tmp_path)
    assert set(uploader.read_records()) == {newer["job_id"]}  # still counts as delivered for planning
    uploader.publish([make_record(tmp_path, 1)], b"{}")
    lines = read_jsonl_bytes(s3.read(f"{PREFIX}/manifest.jsonl"))
    assert len(lines) == 3 and lines[0] == newer and lines[2] == unreadable  # the torn line alone is gone
    uploader.close()
