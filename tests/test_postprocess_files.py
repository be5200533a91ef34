"""`zimage-batch postprocess` and `zimage-batch presets`: files in, preset folders and a JSONL report out;
bad inputs give one clear paragraph, a non-zero exit and no output at all."""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_template
from scenes import bottle_scene, encoded, mug_scene, noise_image
from zimage_batch.cli import main
from zimage_batch.errors import ImageInputError
from zimage_batch.postprocess_files import FileRecord, check_images, open_image
from zimage_batch.presets import PRESETS, presets_table

RECORD_FIELDS = {"input", "preset", "status", "reasons", "explanations", "path", "width", "height", "format", "bytes",
                 "sha256", "quality", "fill_ratio", "border_white_fraction"}


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def report(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "postprocess.jsonl").read_text(encoding="utf-8").splitlines()]


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid, tiny PNG whose header claims width x height 1-bit pixels but which holds one row of them."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    row = zlib.compress(b"\0" * (1 + (width + 7) // 8))  # filter byte + one row
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """A studio's folder: two clean shots (PNG and JPEG), a noise picture and a tiny product."""
    folder = tmp_path_factory.mktemp("photos")
    files = {
        "bottle": ("bottle.png", encoded(bottle_scene((1024, 1024)).image)),
        "mug": ("mug.jpg", encoded(mug_scene((1024, 1024)).image, "JPEG", quality=95)),
        "noise": ("noise.png", encoded(noise_image((512, 512)))),
        "small": ("small.png", encoded(bottle_scene((1024, 1024), half=(0.1, 0.05)).image)),
    }
    for name, data in files.values():
        (folder / name).write_bytes(data)
    return {key: folder / name for key, (name, _) in files.items()}


def test_clean_photos_are_delivered_to_each_preset_folder(photos, tmp_path, capsys) -> None:
    out = tmp_path / "delivered"
    code, stdout, stderr = run_cli(capsys, "postprocess", photos["bottle"], photos["mug"], "--preset", "amazon_main",
                                   "--preset", "taobao_main", "--out", out)
    assert code == 0, stderr
    assert "2 image(s) x 2 preset(s) (amazon_main, taobao_main): 4 ok, 0 rejected" in stdout and stderr == ""
    records = report(out)
    assert [(r["input"], r["preset"]) for r in records] == [
        (str(photos["bottle"]), "amazon_main"), (str(photos["bottle"]), "taobao_main"),
        (str(photos["mug"]), "amazon_main"), (str(photos["mug"]), "taobao_main")]
    for record in records:
        assert set(record) == RECORD_FIELDS and record["status"] == "ok" and record["reasons"] == []
        path = out / record["path"]
        assert record["path"] == f"{record['preset']}/{Path(record['input']).stem}.jpg"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"] and path.stat().st_size == record["bytes"]
        preset = PRESETS[record["preset"]]
        with Image.open(path) as image:
            assert image.size == (record["width"], record["height"]) == (preset.width, preset.height)
            assert image.format == record["format"] == "JPEG"
        assert record["fill_ratio"] == pytest.approx(preset.fill, abs=0.005) and record["border_white_fraction"] == 1.0
    assert sorted(p.name for p in out.iterdir()) == ["amazon_main", "postprocess.jsonl", "taobao_main"]


def test_rejected_inputs_are_named_with_their_reasons_and_never_delivered(photos, tmp_path, capsys) -> None:
    out = tmp_path / "delivered"
    code, stdout, stderr = run_cli(capsys, "postprocess", photos["bottle"], photos["noise"], photos["small"],
                                   "-p", "amazon_main", "-p", "jd_main", "--out", out, "-q")
    assert code == 1 and "Traceback" not in stderr
    assert "3 image(s) x 2 preset(s) (amazon_main, jd_main): 3 ok, 3 rejected, of 6." in stdout
    assert f"{photos['noise']} for amazon_main: backdrop_not_uniform" in stderr
    assert f"{photos['noise']} for jd_main: backdrop_not_uniform" in stderr
    assert f"{photos['small']} for amazon_main: fill_out_of_bounds: the product fills 41% of the frame" in stderr
    records = {(Path(r["input"]).stem, r["preset"]): r for r in report(out)}
    assert records[("small", "jd_main")]["status"] == "ok"  # 800 px needs no more than 4x
    small = records[("small", "amazon_main")]
    assert small["path"] == "rejected/amazon_main/small.jpg" and (out / small["path"]).is_file()
    assert "fill_out_of_bounds" in (out / "rejected/amazon_main/small.reasons.txt").read_text(encoding="utf-8")
    noise = records[("noise", "amazon_main")]
    assert noise["path"] == "rejected/amazon_main/noise.png" and noise["fill_ratio"] is None
    assert (out / noise["path"]).read_bytes() == photos["noise"].read_bytes()  # nothing framed: the input, for review
    delivered = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and "rejected" not in p.parts}
    assert delivered == {"amazon_main/bottle.jpg", "jd_main/bottle.jpg", "jd_main/small.jpg", "postprocess.jsonl"}


def test_a_rerun_moves_files_that_changed_status_and_replaces_the_report(photos, tmp_path, capsys) -> None:
    out = tmp_path / "delivered"
    assert run_cli(capsys, "postprocess", photos["bottle"], "-p", "jd_main", "--out", out)[0] == 0
    assert (out / "jd_main/bottle.jpg").is_file()
    stricter = tmp_path / "stricter.toml"
    stricter.write_text('[jd_main]\nextends = "jd_main"\nfill = 0.95\nfill_min = 0.95\nmax_upscale = 1.0\n', encoding="utf-8")
    code, _, stderr = run_cli(capsys, "postprocess", photos["bottle"], "-p", "jd_main", "--presets-file", stricter, "--out", out)
    assert code == 1 and "fill_out_of_bounds" in stderr
    assert not (out / "jd_main/bottle.jpg").exists() and (out / "rejected/jd_main/bottle.jpg").is_file()
    assert [r["status"] for r in report(out)] == ["rejected"]
    assert run_cli(capsys, "postprocess", photos["bottle"], "-p", "jd_main", "--out", out)[0] == 0
    assert (out / "jd_main/bottle.jpg").is_file() and not any((out / "rejected/jd_main").iterdir())
    assert not list(out.rglob(".zb-tmp-*"))


def test_a_file_that_breaks_off_after_its_header_is_rejected_not_fatal(photos, tmp_path, capsys) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photos["mug"].read_bytes()[:20_000])
    code, _, stderr = run_cli(capsys, "postprocess", broken, photos["bottle"], "-p", "jd_main", "--out", tmp_path / "o")
    assert code == 1 and f"{broken} for jd_main: unreadable_image" in stderr
    assert [r["status"] for r in report(tmp_path / "o")] == ["rejected", "ok"]


@pytest.fixture
def bad(tmp_path, photos) -> dict[str, tuple[list, int, list[str]]]:
    text = tmp_path / "notes.png"
    text.write_text("not an image", encoding="utf-8")
    twin = tmp_path / "other" / "bottle.jpg"
    twin.parent.mkdir()
    twin.write_bytes(photos["mug"].read_bytes())
    presets = tmp_path / "bad.toml"
    presets.write_text("[x]\nfit = 'pad'\n", encoding="utf-8")
    bomb = png_claiming(tmp_path / "bomb.png", 60000, 60000)
    good = [photos["bottle"], "-p", "jd_main"]
    return {
        "missing file": ([tmp_path / "nope.png", "-p", "jd_main"], 2, ["nope.png does not exist", "nothing was written"]),
        "not an image": ([text, photos["bottle"], "-p", "jd_main"], 2, ["notes.png is not a readable image"]),
        "a folder": ([tmp_path / "other", "-p", "jd_main"], 2, ["is a folder; pass the image files in it"]),
        "decompression bomb": ([bomb, photos["bottle"], "-p", "web"], 2, [
            f"{bomb} is too large to decode safely: Image size (3600000000 pixels) exceeds limit of 178956970 pixels",
            "save a smaller copy (at most 178 megapixels", "nothing was written"]),
        "same stem twice": ([photos["bottle"], twin, "-p", "jd_main"], 2, ["have the same name 'bottle'", "Rename one"]),
        "unknown preset": ([photos["bottle"], "-p", "amazon"], 2, ["unknown preset 'amazon' (did you mean 'amazon_main'?)"]),
        "bad presets file": ([*good, "--presets-file", presets], 2, ["bad.toml", "preset 'x'", "format: Field required"]),
        "missing presets file": ([*good, "--presets-file", tmp_path / "none.toml"], 2, ["none.toml does not exist"]),
        "missing weights": ([*good, "--matting", f"birefnet:{tmp_path / 'w.onnx'}"], 3, ["w.onnx does not exist", "never downloads"]),
        "unknown matting": ([*good, "--matting", "magic"], 3, ["not a matting backend"]),
    }


@pytest.mark.parametrize("case", ["missing file", "not an image", "a folder", "decompression bomb", "same stem twice", "unknown preset",
                                  "bad presets file", "missing presets file", "missing weights", "unknown matting"])
def test_bad_input_gives_a_clear_error_and_no_output(case, bad, tmp_path, capsys) -> None:
    args, expected, phrases = bad[case]
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, "postprocess", *args, "--out", out)
    assert code == expected, stderr
    assert stderr.startswith("error: ") and "Traceback" not in stderr and stdout == ""
    for phrase in phrases:
        assert phrase in stderr, stderr
    assert not out.exists()


def test_an_output_path_that_is_a_file_is_refused(photos, tmp_path, capsys) -> None:
    taken = tmp_path / "taken"
    taken.write_text("x", encoding="utf-8")
    code, _, stderr = run_cli(capsys, "postprocess", photos["bottle"], "-p", "jd_main", "--out", taken)
    assert code == 2 and f"--out {taken} is a file" in stderr and "Traceback" not in stderr


def test_presets_prints_the_table_with_a_users_file(tmp_path, capsys) -> None:
    mine = tmp_path / "mine.toml"
    mine.write_text('[amazon_tight]\nextends = "amazon_main"\nfill = 0.9\nfill_max = 0.95\n', encoding="utf-8")
    code, stdout, _ = run_cli(capsys, "presets", "--presets-file", mine)
    assert code == 0 and "amazon_tight" in stdout and "90% (80%-95%)" in stdout
    code, stdout, _ = run_cli(capsys, "presets", "--markdown")
    assert code == 0 and stdout.strip() == presets_table(PRESETS, markdown=True)
    code, _, stderr = run_cli(capsys, "presets", "--presets-file", tmp_path / "none.yaml")
    assert code == 2 and stderr.startswith("error: Presets file") and "Traceback" not in stderr


def test_templates_can_name_presets_from_a_presets_file(tmp_path, capsys) -> None:
    from conftest import write_csv

    catalog = write_csv(tmp_path / "c.csv", ["sku", "title"], [["S1", "Mug"]])
    template = write_template(tmp_path / "t.j2", "{{ title }} on white", "presets: [amazon_tight]\nbackground: white")
    code, _, stderr = run_cli(capsys, "plan", catalog, "-t", template)
    assert code == 2 and "unknown preset 'amazon_tight'" in stderr
    mine = tmp_path / "mine.toml"
    mine.write_text('[amazon_tight]\nextends = "amazon_main"\nfill = 0.9\n', encoding="utf-8")
    code, stdout, stderr = run_cli(capsys, "plan", catalog, "-t", template, "--presets-file", mine)
    assert code == 0 and "1 jobs from 1 rows" in stdout, stderr


def test_help_shows_real_examples(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["postprocess", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "zimage-batch postprocess photos/*.png --preset amazon_main --preset taobao_main --out delivered/" in text
    assert "--matting" in text and "--presets-file" in text and "postprocess.jsonl" in text


def test_big_jpegs_are_decoded_at_a_reduced_scale(tmp_path) -> None:
    path = tmp_path / "studio.jpg"
    path.write_bytes(encoded(bottle_scene((2000, 3000)).image, "JPEG", quality=90))
    assert open_image(path, max_side=1000).size == (1500, 1000)  # DCT scaling 1/2: still >= 1000 px long
    assert open_image(path, max_side=2000).size == (3000, 2000)  # under 2x the working size: full decode


def test_open_image_refuses_a_decompression_bomb(tmp_path) -> None:
    bomb = png_claiming(tmp_path / "bomb.png", 60000, 60000)
    with pytest.raises(ImageInputError, match=r"bomb.png is too large to decode safely: .*3600000000 pixels"):
        open_image(bomb)


def test_images_between_pillows_warning_and_hard_limit_pass_without_a_warning(tmp_path, capsys) -> None:
    big = png_claiming(tmp_path / "big.png", 9500, 9500)  # 90 megapixels: Pillow warns; medium format is real
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert check_images([str(big)]) == [big]
        code, _, stderr = run_cli(capsys, "postprocess", big, "-p", "web", "--out", tmp_path / "o")
    assert code == 1 and f"{big} for web: black" in stderr and "Traceback" not in stderr  # one row of data: the rest is black
    assert [r["status"] for r in report(tmp_path / "o")] == ["rejected"]


def test_records_validate_as_the_documented_model(photos, tmp_path) -> None:
    from zimage_batch.postprocess_files import postprocess_files

    seen: list[FileRecord] = []
    summary = postprocess_files([str(photos["bottle"])], ["web_avif", "png"], tmp_path / "o", on_record=seen.append)
    assert [r.preset for r in seen] == ["web_avif", "png"] and summary.ok == 2 and summary.rejected_count == 0
    assert [FileRecord(**r) for r in report(tmp_path / "o")] == seen
    assert seen[0].format == "AVIF" and seen[0].quality == 70 and seen[1].quality is None
    assert np.asarray(Image.open(tmp_path / "o" / seen[1].path)).shape == (1024, 1024, 3)


def test_make_photos_gives_the_readmes_postprocess_example(tmp_path, capsys) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(Path(__file__).parent / "scenes.py"), str(tmp_path / "photos")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    shots = sorted((tmp_path / "photos").iterdir())
    assert [p.name for p in shots] == ["bottle.png", "lamp.png", "mug.jpg", "poster.png"]
    code, out, err = run_cli(capsys, "postprocess", *shots, "-p", "amazon_main", "-p", "taobao_main", "--out", tmp_path / "delivered")
    assert code == 1 and "6 ok, 2 rejected, of 8" in out
    assert "photos/poster.png for amazon_main: backdrop_not_uniform" in err


def test_a_picture_too_small_to_cut_out_is_rejected_and_the_batch_goes_on(photos, tmp_path, capsys) -> None:
    tiny = tmp_path / "tiny8.png"
    bottle_scene((8, 8)).image.save(tiny)
    strip = tmp_path / "strip.png"
    bottle_scene((6, 3000), half=(0.3, 0.02)).image.save(strip)
    out = tmp_path / "o"
    code, _, stderr = run_cli(capsys, "postprocess", photos["bottle"], tiny, strip, photos["mug"], "-p", "amazon_main",
                              "-p", "square_1080", "--out", out)
    assert code == 1 and "Traceback" not in stderr
    assert f"{tiny} for amazon_main: too_small: the picture is 8x8 px" in stderr
    assert f"{strip} for amazon_main: too_small: the picture is 3000x6 px" in stderr
    assert f"{tiny} for square_1080: low_resolution" in stderr
    records = report(out)
    assert [(Path(r["input"]).stem, r["status"]) for r in records] == [
        ("bottle", "ok"), ("bottle", "ok"), ("tiny8", "rejected"), ("tiny8", "rejected"),
        ("strip", "rejected"), ("strip", "rejected"), ("mug", "ok"), ("mug", "ok")]  # the last input too


def test_an_unexpected_error_on_one_picture_is_its_rejection_not_the_batchs_end(photos, tmp_path, capsys, monkeypatch) -> None:
    import zimage_batch.postprocess_files as files

    real = files.process

    def flaky(source, preset, **kw):
        if source.image.size == (512, 512):  # the noise picture
            raise RuntimeError("simulated bug")
        return real(source, preset, **kw)

    monkeypatch.setattr(files, "process", flaky)
    out = tmp_path / "o"
    code, _, stderr = run_cli(capsys, "postprocess", photos["noise"], photos["bottle"], "-p", "web", "--out", out)
    assert code == 1 and "Traceback" not in stderr
    assert f"{photos['noise']} for web: processing_failed: processing failed with RuntimeError: simulated bug" in stderr
    assert [r["status"] for r in report(out)] == ["rejected", "ok"]
    assert (out / "rejected/web/noise.png").read_bytes() == photos["noise"].read_bytes()  # the input, for review


def test_a_stopped_command_leaves_no_stale_report_and_the_next_clears_its_temp_files(photos, tmp_path, capsys, monkeypatch) -> None:
    import zimage_batch.postprocess_files as files

    out = tmp_path / "o"
    assert run_cli(capsys, "postprocess", photos["bottle"], photos["mug"], "-p", "web", "--out", out)[0] == 0
    left = [out / "web" / ".zb-tmp-m52y590j", out / ".zb-tmp-postprocess.jsonl.abc123"]  # as a killed command leaves them
    for path in left:
        path.write_bytes(b"\xff\xd8 complete-looking bytes")
    real, calls = files._deliver, []

    def interrupted(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(files, "_deliver", interrupted)
    assert main(["postprocess", str(photos["bottle"]), str(photos["mug"]), "-p", "web", "--out", str(out)]) == 130
    assert not (out / "postprocess.jsonl").exists()  # the old one described files this command rewrote
    assert not any(path.exists() for path in left) and not list(out.rglob(".zb-tmp-*"))
    monkeypatch.setattr(files, "_deliver", real)
    assert run_cli(capsys, "postprocess", photos["bottle"], photos["mug"], "-p", "web", "--out", out)[0] == 0
    assert [r["status"] for r in report(out)] == ["ok", "ok"] and not (out / ".zimage-batch.lock").exists()


def test_a_folder_another_command_writes_to_is_refused(photos, tmp_path, capsys) -> None:
    import fcntl
    import os

    out = tmp_path / "o"
    out.mkdir()
    fd = os.open(out / ".zimage-batch.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"pid 1 on elsewhere")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        code, _, stderr = run_cli(capsys, "postprocess", photos["bottle"], "-p", "web", "--out", out)
    finally:
        os.close(fd)
    assert code == 2 and "is in use by another zimage-batch run (pid 1 on elsewhere" in stderr
    assert not (out / "web").exists()


def test_the_report_and_rejected_names_are_reserved_for_presets() -> None:
    from zimage_batch.postprocess_files import REJECTED, REPORT
    from zimage_batch.presets import RESERVED_NAMES

    assert {REPORT, REJECTED} == set(RESERVED_NAMES)


def test_a_frame_larger_than_the_working_size_is_made_from_the_full_picture(tmp_path, capsys) -> None:
    columns = np.where(np.arange(5000) % 2 == 0, 0, 255).astype(np.uint8)  # 1-px stripes: any resampling blurs them
    striped = tmp_path / "striped.png"
    Image.fromarray(np.repeat(np.tile(columns, (40, 1))[..., None], 3, axis=2)).save(striped)
    mine = tmp_path / "big.toml"
    mine.write_text('[wide]\nextends = "png"\nlong_side = 5000\n', encoding="utf-8")
    out = tmp_path / "o"
    assert run_cli(capsys, "postprocess", striped, "-p", "wide", "-p", "png", "--presets-file", mine, "--out", out)[0] == 0
    with Image.open(out / "wide/striped.png") as wide:
        assert np.array_equal(np.asarray(wide.convert("RGB")), np.asarray(Image.open(striped)))  # not 4096 and back up
    with Image.open(out / "png/striped.png") as png:
        assert png.size == (5000, 40)  # the reduction is shared by every preset of the command
