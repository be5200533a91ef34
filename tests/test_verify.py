"""verify: every file present, unaltered and carrying its provenance; damage is named per file."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import RecordingEngine, product_on_white
from test_generate import job
from test_manifest import V1_LINE
from test_shard import noise
from zimage_batch.cli import main
from zimage_batch.manifest import MANIFEST, Manifest, read_jsonl
from zimage_batch.shard import process_shard
from zimage_batch.store import LocalStore


def make_run(out: Path, sealer=None) -> list[dict]:
    """A finished output folder: a scene job (JPEG, WebP, PNG) and a white job (amazon_main JPEG)."""
    jobs = [job("a mug", 1, presets=("web", "web_webp", "png")),
            job("a bottle", 2, size=1024, background="white", presets=("amazon_main",))]  # amazon_main enlarges at most 4x
    engine = RecordingEngine(lambda j, seed, call: product_on_white(1024) if j.background == "white" else noise(j, seed, call))
    manifest = Manifest(out)
    process_shard(jobs, engine, LocalStore(out), manifest, sealer=sealer)
    manifest.finalize()
    return read_jsonl(out / MANIFEST)


def verify_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["verify", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def output_path(records, preset: str) -> str:
    return next(o["path"] for r in records for o in r["outputs"] if o["preset"] == preset)


def test_a_fresh_run_verifies(tmp_path, capsys):
    records = make_run(tmp_path / "out")
    assert {r["status"] for r in records} == {"ok"}
    code, out, _ = verify_cli(capsys, tmp_path / "out")
    assert code == 0, out
    assert out.strip() == f"OK: 4 file(s) of 2 manifest record(s) in {tmp_path / 'out'}: all present, unaltered, with their provenance."


def test_the_command_exits_0_after_saying_ok(tmp_path):
    """As cron runs it: pyarrow's reader threads made most runs abort at exit (134) after printing OK."""
    import subprocess
    import sys

    make_run(tmp_path / "out")
    command = [str(Path(sys.executable).parent / "zimage-batch"), "verify", str(tmp_path / "out")]
    codes = [subprocess.run(command, capture_output=True, text=True, timeout=120).returncode for _ in range(4)]
    assert codes == [0, 0, 0, 0]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def strip_metadata(path: Path) -> None:
    image = Image.open(path)
    image.load()
    buffer = io.BytesIO()
    image.save(buffer, image.format)  # Pillow writes no EXIF/XMP unless asked
    path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize("preset, damage, label, reason", [
    ("web", flip_byte, "ALTERED", "altered: SHA-256"),
    ("web_webp", flip_byte, "ALTERED", "altered: SHA-256"),
    ("png", strip_metadata, "STRIPPED", "metadata stripped: no XMP and no A1111 parameters"),
    ("amazon_main", strip_metadata, "STRIPPED", "metadata stripped"),
    ("web", Path.unlink, "MISSING", "missing"),
])
def test_damage_is_named_per_file(tmp_path, capsys, preset, damage, label, reason):
    out = tmp_path / "out"
    records = make_run(out)
    path = output_path(records, preset)
    damage(out / path)
    code, stdout, _ = verify_cli(capsys, out)
    assert code == 1
    lines = stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{label:<10} {path}: {reason}")
    assert lines[1].startswith("FAILED: 4 file(s) of 2 manifest record(s)") and "1 bad file(s), 0 file(s) not in the manifest" in lines[1]


def test_stray_files_are_listed(tmp_path, capsys):
    out = tmp_path / "out"
    make_run(out)
    (out / "images/S/t/extra.jpg").write_bytes(b"not ours")
    (out / "notes.txt").write_text("hello")
    code, stdout, _ = verify_cli(capsys, out)
    assert code == 1
    assert "STRAY      images/S/t/extra.jpg: not in the manifest" in stdout and "STRAY      notes.txt: not in the manifest" in stdout
    assert "0 bad file(s), 2 file(s) not in the manifest" in stdout


def test_a_record_deleted_from_the_manifest_is_named_from_the_parquet_copy(tmp_path, capsys):
    out = tmp_path / "out"
    records = make_run(out)
    web, amazon = output_path(records, "web"), output_path(records, "amazon_main")
    kept = [r for r in records if r["outputs"][0]["preset"] == "amazon_main"]  # the scene job's record is deleted ...
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in kept))
    for output in next(r for r in records if r not in kept)["outputs"]:
        if output["path"] != web:
            (out / output["path"]).unlink()  # ... and all its files but one
    code, stdout, _ = verify_cli(capsys, out)
    assert code == 1
    assert f"MISSING    {web}: its record (job id-a mug-1, sku S) was deleted from manifest.jsonl; manifest.parquet" in stdout
    assert "the file is still here" in stdout and stdout.count("the file is gone too") == 2 and "STRAY" not in stdout
    assert "FAILED: 1 file(s) of 1 manifest record(s)" in stdout and "3 bad file(s)" in stdout and amazon not in stdout

    (out / "manifest.parquet").write_bytes(b"PAR1 not parquet")
    code, stdout, _ = verify_cli(capsys, out)
    assert code == 1 and "UNREADABLE manifest.parquet: is not a manifest.parquet zimage-batch wrote" in stdout


def test_a_dangling_link_in_the_folder_is_a_stray(tmp_path, capsys):
    out = tmp_path / "out"
    make_run(out)
    (out / "images/gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    code, stdout, _ = verify_cli(capsys, out)
    assert code == 1 and "STRAY      images/gone.jpg: not in the manifest" in stdout


def test_embedded_metadata_that_disagrees_with_the_manifest_is_named(tmp_path, capsys):
    out = tmp_path / "out"
    records = make_run(out)
    records[0]["image_seed"] += 1  # the files still match their hashes, but no longer their record
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in records))
    code, stdout, _ = verify_cli(capsys, out)
    assert code == 1
    bad = [line for line in stdout.splitlines() if line.startswith("METADATA")]
    assert len(bad) == 3 and all("zb:imageSeed is '1', the manifest says '2'" in line for line in bad)


def test_a_v1_file_without_provenance_is_reported_as_such(tmp_path, capsys):
    out = tmp_path / "out"
    record = json.loads(V1_LINE)
    path = out / record["outputs"][0]["path"]
    path.parent.mkdir(parents=True)
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), "white").save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue())
    import hashlib

    record["outputs"][0]["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    (out / MANIFEST).write_text(json.dumps(record) + "\n")
    code, stdout, _ = verify_cli(capsys, out)
    assert code == 1 and "no embedded provenance: written by a run before provenance was embedded (manifest schema v1)" in stdout


@pytest.mark.parametrize("case, phrases", [
    ("invalid manifest", ["manifest.jsonl does not follow the manifest schema", "line 2: 'status' is a required property"]),
    ("no manifest", ["manifest.jsonl does not exist", "--out folder"]),
    ("not a folder", ["is not a folder"]),
    ("unfinished run", ["holds manifest parts of a run that has not finished (.parts/shard-000001.jsonl", "Rerun the same"]),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, case, phrases):
    out = tmp_path / "out"
    target = out
    if case == "invalid manifest":
        records = make_run(out)
        del records[1]["status"]
        (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in records))
    elif case == "no manifest":
        out.mkdir()
    elif case == "not a folder":
        target = tmp_path / "missing"
    elif case == "unfinished run":
        make_run(out)
        (out / ".parts").mkdir()
        (out / ".parts/shard-000001.jsonl").write_text("")
    code, stdout, stderr = verify_cli(capsys, target)
    assert code == 2 and stdout == "" and stderr.startswith("error: ") and "Traceback" not in stderr
    for phrase in phrases:
        assert phrase in stderr, stderr


def test_provenance_and_verify_import_without_torch():
    import subprocess
    import sys

    code = ("import sys, zimage_batch.provenance, zimage_batch.verify, zimage_batch.signing; "
            "print(sorted(m for m in ('torch', 'diffusers', 'c2pa') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


@pytest.fixture
def aws_env(tmp_path, monkeypatch):
    """Standard AWS settings with nothing from this machine: dummy keys, an endpoint that refuses connections."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "zb-key", "AWS_SECRET_ACCESS_KEY": "zb-secret",
           "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"), "AWS_EC2_METADATA_DISABLED": "true"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


@pytest.mark.parametrize("case, phrases", [
    ("bad bucket name", ["Cannot verify s3://Bad_Bucket/run: 'Bad_Bucket' is not a valid bucket name"]),
    ("endpoint not a URL", ["AWS_ENDPOINT_URL is not a URL botocore accepts", "http://127.0.0.1:8333"]),
    ("unknown profile", ["AWS_PROFILE names the profile 'nosuch'", "unset AWS_PROFILE"]),
    ("config not INI", ["broken.ini is not a valid INI file", "AWS_CONFIG_FILE"]),
    ("credentials not INI", ["broken.ini is not a valid INI file", "AWS_SHARED_CREDENTIALS_FILE"]),
    ("no credentials", ["no AWS credentials were found", "AWS_ACCESS_KEY_ID"]),
    ("unreachable endpoint", ["Cannot read s3://zb-bucket/run (endpoint http://127.0.0.1:1) to verify it: could not "
                              "reach the endpoint", "AWS_ENDPOINT_URL"]),
])
def test_bad_s3_settings_are_one_clear_error_about_verify(aws_env, tmp_path, capsys, case, phrases):
    target = "s3://Bad_Bucket/run" if case == "bad bucket name" else "s3://zb-bucket/run"
    if case == "endpoint not a URL":
        aws_env.setenv("AWS_ENDPOINT_URL", "not-a-url")
    elif case == "unknown profile":
        aws_env.setenv("AWS_PROFILE", "nosuch")
    elif case in ("config not INI", "credentials not INI"):
        (tmp_path / "broken.ini").write_text("[default\nregion = eu-central-1\n")
        aws_env.setenv("AWS_CONFIG_FILE" if case == "config not INI" else "AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "broken.ini"))
    elif case == "no credentials":
        aws_env.delenv("AWS_ACCESS_KEY_ID")
        aws_env.delenv("AWS_SECRET_ACCESS_KEY")
    code, stdout, stderr = verify_cli(capsys, target)
    expected = 2 if case == "bad bucket name" else 4  # a malformed URI is a bad path; the rest cannot be read
    assert code == expected and stdout == "" and stderr.startswith("error: ") and "Traceback" not in stderr
    assert "deliver" not in stderr and "--dest" not in stderr and "Nothing was generated" not in stderr
    assert "zb-secret" not in stderr
    for phrase in phrases:
        assert phrase in stderr, stderr


@pytest.mark.parametrize("case, phrase", [
    ("missing bucket", "bucket 'no-such-bucket-zb' does not exist there"),
    ("wrong secret", "the server rejected the credentials"),
])
def test_s3_errors_while_reading_a_prefix_speak_of_verify(s3, monkeypatch, capsys, case, phrase):
    target = "s3://no-such-bucket-zb/run" if case == "missing bucket" else f"s3://{s3.bucket}/run"
    if case == "wrong secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "zb-wrong-secret")
    code, stdout, stderr = verify_cli(capsys, target)
    assert code == 4 and stdout == "" and "Traceback" not in stderr
    assert stderr.startswith(f"error: Cannot read {target} (endpoint {s3.server.endpoint}) to verify it: {phrase}"), stderr
    assert "deliver" not in stderr and "Nothing was generated" not in stderr


def rewrite(out: Path, records: list[dict]) -> None:
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_record_whose_prompt_and_settings_were_rewritten_is_named_field_by_field(tmp_path, capsys):
    out = tmp_path / "out"
    records = make_run(out)
    records[0].update(prompt="a photo made by a human photographer", negative_prompt="x", steps=50, seed=777, width=2048,
                      sku="../../../escaped")
    rewrite(out, records)
    code, stdout, _ = verify_cli(capsys, out)
    assert code == 1
    bad = [line for line in stdout.splitlines() if line.startswith("METADATA")]
    assert len(bad) == 3, stdout  # the record's three files
    for line in bad:
        for name in ("zb:prompt", "zb:negativePrompt", "zb:steps", "zb:seed", "zb:width", "zb:sku", "parameters Steps"):
            assert f"{name} is " in line, line
        assert "the manifest says 'a photo made by a human photographer'" in line


def test_a_record_with_files_but_no_image_seed_is_reported_not_a_traceback(tmp_path, capsys):
    out = tmp_path / "out"
    records = make_run(out)
    records[0].update(status="failed", image_seed=None)
    rewrite(out, records)
    code, stdout, stderr = verify_cli(capsys, out)
    assert code == 1 and "Traceback" not in stderr
    bad = [line for line in stdout.splitlines() if line.startswith("METADATA")]
    assert len(bad) == 3 and all(f"job {records[0]['job_id']} lists this file but has no image_seed" in line for line in bad)


@pytest.mark.parametrize("how", ["absolute", "dot-dot"])
def test_manifest_paths_outside_the_run_folder_are_not_followed(tmp_path, capsys, how):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    records = make_run(out)
    path = output_path(records, "web")
    (elsewhere / path).parent.mkdir(parents=True)
    (out / path).rename(elsewhere / path)  # the file is no longer in the run's folder...
    pointer = str(elsewhere / path) if how == "absolute" else f"../elsewhere/{path}"
    for output in records[0]["outputs"]:
        if output["path"] == path:
            output["path"] = pointer  # ...but the manifest points at where it is
    rewrite(out, records)
    code, stdout, _ = verify_cli(capsys, out)
    assert code == 1
    assert stdout.startswith(f"MISSING    {pointer}: outside the run folder: the manifest record of job {records[0]['job_id']}")


def test_a_path_too_long_for_the_file_system_is_a_finding(tmp_path, capsys):
    out = tmp_path / "out"
    records = make_run(out)
    records[0]["outputs"][0]["path"] = "images/" + "x" * 300 + ".jpg"
    rewrite(out, records)
    code, stdout, stderr = verify_cli(capsys, out)
    assert code == 1 and "Traceback" not in stderr
    assert f"UNREADABLE images/{'x' * 300}.jpg: cannot be read (File name too long)" in stdout


def test_a_run_in_progress_is_named_before_its_missing_manifest(tmp_path, capsys):
    from zimage_batch.store import locked

    out = tmp_path / "out"
    (out / ".parts").mkdir(parents=True)
    (out / ".parts/shard-000000.jsonl").write_text("")
    code, _, stderr = verify_cli(capsys, out)
    assert code == 2 and "holds manifest parts of a run that has not finished" in stderr and "does not exist" not in stderr
    (out / ".parts/shard-000000.jsonl").unlink()
    (out / ".parts").rmdir()
    with locked(out):  # a run that is still loading its model: a lock, nothing else yet
        code, _, stderr = verify_cli(capsys, out)
    assert code == 2 and "is being written by a zimage-batch run right now (pid " in stderr, stderr
    code, _, stderr = verify_cli(capsys, out)  # the run has ended (without a manifest)
    assert code == 2 and "manifest.jsonl does not exist" in stderr


def test_a_malformed_s3_uri_is_a_bad_path(capsys):
    code, stdout, stderr = verify_cli(capsys, "s3://")
    assert code == 2 and stdout == "" and stderr.startswith("error: Cannot verify s3://: ") and "bucket name" in stderr


def test_an_s3_prefix_without_a_manifest_is_named_as_a_prefix(s3, capsys):
    code, _, stderr = verify_cli(capsys, f"s3://{s3.bucket}/no-run-here")
    assert code == 2 and f"s3://{s3.bucket}/no-run-here/manifest.jsonl does not exist" in stderr
    assert "Pass the s3:// prefix a run delivered to (its --dest)" in stderr and "--out folder" not in stderr
