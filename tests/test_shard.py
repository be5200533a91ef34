import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import RecordingEngine, product_on_white
from test_generate import job
from zimage_batch.generate import Engine, build_tiny_pipeline
from zimage_batch.manifest import Manifest
from zimage_batch.models import resolve_model
from zimage_batch.plan import derive_seed
from zimage_batch.presets import load_presets
from zimage_batch.shard import batches, process_shard
from zimage_batch.store import LocalStore


def noise(j, seed, call):
    return np.random.default_rng(seed).random((j.height, j.width, 3), dtype=np.float32)


def run(tmp_path, jobs, engine, **kw):
    store, manifest = LocalStore(tmp_path), Manifest(tmp_path)
    result = process_shard(jobs, engine, store, manifest, **kw)
    return result, manifest


def test_batches_group_by_size_and_settings():
    jobs = [job(seed=i, size=256 if i % 2 else 512) for i in range(7)]
    out = list(batches(jobs, 2))
    assert [len(b) for b in out] == [2, 2, 2, 1]  # four 512s first (first seen), then three 256s
    assert all(len({j.batch_key() for j in b}) == 1 for b in out)


def test_black_image_is_regenerated_with_the_next_derived_seed(tmp_path):
    j = job()
    engine = RecordingEngine(lambda job_, seed, call: np.zeros((256, 256, 3), np.float32) if call == 0 else noise(job_, seed, call))
    result, manifest = run(tmp_path, [j], engine)
    rec = manifest.records[j.job_id]
    retry_seed = derive_seed(j.seed, "retry", 1)
    assert [(a.seed, a.outcome) for a in rec.attempts] == [(j.seed, "black"), (retry_seed, "ok")]
    assert rec.status == "ok" and rec.image_seed == retry_seed and result.generated == 1
    assert engine.calls == [[(j.job_id, j.seed)], [(j.job_id, retry_seed)]]


def test_an_image_that_stays_black_is_never_delivered(tmp_path):
    j = job()
    engine = RecordingEngine(lambda *a: np.zeros((256, 256, 3), np.float32))
    result, manifest = run(tmp_path, [j], engine, max_attempts=3)
    rec = manifest.records[j.job_id]
    assert rec.status == "failed" and rec.outputs == [] and len(rec.attempts) == 3
    assert rec.reasons == ["black image on all 3 attempts"] and result.failed == 1
    assert not (tmp_path / "images").exists()


def test_a_failing_batch_is_recorded_and_the_shard_goes_on(tmp_path):
    jobs = [job(seed=1, size=256), job(seed=2, size=512)]

    def make(j, seed, call):
        if j.width == 256:
            raise RuntimeError("CUDA out of memory (simulated)")
        return noise(j, seed, call)

    result, manifest = run(tmp_path, jobs, RecordingEngine(make))
    assert manifest.records[jobs[0].job_id].status == "failed"
    assert "out of memory" in manifest.records[jobs[0].job_id].reasons[0]
    assert manifest.records[jobs[1].job_id].status == "ok"
    assert (result.generated, result.failed) == (1, 1)


def test_white_background_job_is_cut_out_and_fit_to_amazon_main(tmp_path):
    j = job(background="white", presets=("amazon_main", "web"), size=1024)  # 256 px would need > 4x enlargement
    result, manifest = run(tmp_path, [j], RecordingEngine(lambda *a: product_on_white(1024)))
    rec = manifest.records[j.job_id]
    assert rec.status == "ok", rec.reasons
    outputs = {o.preset: o for o in rec.outputs}
    assert set(outputs) == {"amazon_main", "web"}
    amazon = Image.open(tmp_path / outputs["amazon_main"].path)
    assert amazon.size == (2000, 2000) and amazon.format == "JPEG" and (outputs["amazon_main"].width, outputs["amazon_main"].height) == (2000, 2000)
    pixels = np.asarray(amazon.convert("RGB"))
    border = np.concatenate([pixels[:4].reshape(-1, 3), pixels[-4:].reshape(-1, 3), pixels[:, :4].reshape(-1, 3), pixels[:, -4:].reshape(-1, 3)])
    assert (border == 255).all()
    assert "/amazon_main" not in outputs["amazon_main"].path and outputs["amazon_main"].path.startswith("images/S/t/")


def test_noise_on_a_white_template_is_rejected_and_kept_for_review(tmp_path):
    j = job(background="white", presets=("amazon_main",))
    result, manifest = run(tmp_path, [j], RecordingEngine(noise))
    rec = manifest.records[j.job_id]
    assert rec.status == "rejected" and rec.reasons == ["backdrop_not_uniform"] and result.rejected == 1
    assert rec.outputs[0].path.startswith("rejected/") and (tmp_path / rec.outputs[0].path).is_file()
    assert not (tmp_path / "images").exists()


def test_white_job_failing_a_gate_is_rejected_with_its_reasons_and_nothing_delivered(tmp_path):
    def small_product(*a):  # 120 px on 1024: amazon_main's 85% would need 14x enlargement
        image = np.full((1024, 1024, 3), 246 / 255, dtype=np.float32)
        image[452:572, 482:542] = (0.15, 0.25, 0.5)
        return image

    j = job(background="white", presets=("amazon_main", "web"), size=1024)
    result, manifest = run(tmp_path, [j], RecordingEngine(small_product))
    rec = manifest.records[j.job_id]
    assert rec.status == "rejected" and rec.reasons == ["fill_out_of_bounds"] and result.rejected == 1
    assert [o.preset for o in rec.outputs] == ["amazon_main", "web"]  # what each preset made, kept for review
    assert all(o.path.startswith("rejected/") and (tmp_path / o.path).is_file() for o in rec.outputs)
    assert not (tmp_path / "images").exists()


def test_a_run_uses_presets_from_a_presets_file(tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text('[square_white]\nextends = "jd_main"\nwidth = 600\nheight = 600\nformat = "WEBP"\n', encoding="utf-8")
    j = job(background="white", presets=("square_white",), size=1024)
    result, manifest = run(tmp_path, [j], RecordingEngine(lambda *a: product_on_white(1024)), presets=load_presets(mine))
    rec = manifest.records[j.job_id]
    assert rec.status == "ok", rec.reasons
    assert rec.outputs[0].path.endswith("_square_white.webp") and (rec.outputs[0].width, rec.outputs[0].format) == (600, "WEBP")


def test_real_pipeline_that_only_makes_black_images_fails_cleanly(tmp_path):
    pipe = build_tiny_pipeline()
    with torch.no_grad():  # a decoder whose output is always -1, i.e. black
        pipe.vae.decoder.conv_out.weight.zero_()
        pipe.vae.decoder.conv_out.bias.fill_(-10.0)
    pipe.set_progress_bar_config(disable=True)
    engine = Engine(pipe, "cpu", resolve_model("tiny-random"), 0.0, "black:0")
    j = job()
    result, manifest = run(tmp_path, [j], engine, max_attempts=2)
    rec = manifest.records[j.job_id]
    assert rec.status == "failed" and [a.outcome for a in rec.attempts] == ["black", "black"]
    assert rec.attempts[0].seed != rec.attempts[1].seed


def test_a_failed_batch_and_out_of_memory_splits_in_one_shard(tmp_path):
    jobs = [job(seed=i) for i in range(4)] + [job(seed=9, size=512)]

    def make(j, seed, call):
        if j.width == 512:
            raise RuntimeError("device-side assert triggered (simulated)")
        return noise(j, seed, call)

    engine = RecordingEngine(make, max_fitting_batch=1)
    result, manifest = run(tmp_path, jobs, engine, batch_size=4)
    assert (result.generated, result.failed) == (4, 1)
    assert {manifest.records[j.job_id].batch_size for j in jobs[:4]} == {1}  # split down to single images
    assert "device-side assert" in manifest.records[jobs[4].job_id].reasons[0]


def test_the_size_cap_holds_for_the_sealed_file_with_its_provenance(tmp_path):
    """The metadata (prompt, parameters; a signature with C2PA) is added after encoding: a file the
    encoder fitted under the cap is encoded again with room for it, not delivered over the cap."""
    from zimage_batch.postprocess import Source, process

    from zimage_batch.provenance import Stamp
    from zimage_batch.shard import default_sealer

    j = job("a ceramic mug on a kitchen table, " * 90, presets=("capped",), size=256)  # ~3 KB of prompt, embedded twice
    plain = process(Source(product_on_white(256)), load_presets(None)["web"]).rendered.data
    sealer = default_sealer()
    overhead = len(sealer.seal(plain, Stamp.of(j.to_dict(), j.seed, sealer.software), "x.jpg")) - len(plain)
    cap = len(plain) + overhead - 1500  # room for the encoder's output at full quality, not for the metadata too
    assert len(plain) <= cap < len(plain) + overhead
    mine = tmp_path / "capped.toml"
    mine.write_text(f'[capped]\nextends = "web"\nmax_bytes = {cap}\nmin_quality = 20\n', encoding="utf-8")
    result, manifest = run(tmp_path / "out", [j], RecordingEngine(lambda *a: product_on_white(256)), presets=load_presets(mine))
    rec = manifest.records[j.job_id]
    assert rec.status == "ok", rec.reasons
    (output,) = rec.outputs
    assert output.bytes <= cap and (tmp_path / "out" / output.path).stat().st_size == output.bytes


def test_a_seal_that_fails_leaves_no_file_behind(tmp_path):
    j = job("a mug " * 12000, presets=("png", "web"), size=256)  # ~72 KB of prompt: no JPEG segment holds it
    result, manifest = run(tmp_path, [j], RecordingEngine(lambda *a: product_on_white(256)))
    rec = manifest.records[j.job_id]
    assert rec.status == "failed" and "post-processing failed" in rec.reasons[0] and result.failed == 1
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".png", ".jpg")]


def test_a_folder_that_takes_no_more_files_stops_the_shard_with_the_images_so_far_recorded(tmp_path, monkeypatch):
    import errno

    from zimage_batch.errors import OutputError

    jobs = [job("a mug", seed) for seed in range(6)]
    real, writes = LocalStore.write, []

    def fills_up(self, relpath, data):  # the disk is full from the 3rd file on, as a real ENOSPC reads
        writes.append(relpath)
        if len(writes) > 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.root / relpath))
        return real(self, relpath, data)

    monkeypatch.setattr(LocalStore, "write", fills_up)
    with pytest.raises(OutputError, match=r"takes no more files \(No space left on device: .*run the same command again"):
        run(tmp_path / "out", jobs, RecordingEngine(noise), batch_size=1)
    records = Manifest(tmp_path / "out").records
    assert [r.status for r in records.values()] == ["ok", "ok"]  # no 'failed' record for the jobs after: they were not made
    assert len(writes) <= 4  # it stopped at the first file that did not fit (the next batch may have been finishing)


def test_a_file_that_cannot_be_stored_for_another_reason_fails_that_job_only(tmp_path, monkeypatch):
    import errno

    real = LocalStore.write

    def too_long(self, relpath, data):  # the first file only
        if too_long.first:
            too_long.first = False
            raise OSError(errno.ENAMETOOLONG, "File name too long", relpath)
        return real(self, relpath, data)

    too_long.first = True
    monkeypatch.setattr(LocalStore, "write", too_long)
    result, manifest = run(tmp_path / "out", [job("a mug", 1), job("a cup", 2)], RecordingEngine(noise), batch_size=1)
    statuses = sorted(r.status for r in manifest.records.values())
    assert statuses == ["failed", "ok"] and result.failed == 1
    failed = next(r for r in manifest.records.values() if r.status == "failed")
    assert failed.reasons[0].startswith("storing failed: OSError: [Errno 36] File name too long")
