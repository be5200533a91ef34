"""The command line: bad inputs give one clear paragraph, a non-zero exit and no output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CATALOGS, ROOT, TEMPLATES, write_csv, write_template
from zimage_batch.cli import main

WHITE = str(TEMPLATES / "product_white.j2")


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def bad_inputs(tmp_path):
    good = write_csv(tmp_path / "good.csv", ["sku", "title", "color", "kind", "material"], [["S1", "Mug", "red", "mug", "clay"]])
    no_col = write_csv(tmp_path / "nocolor.csv", ["sku", "title", "kind", "material"], [["S1", "Mug", "mug", "clay"]])
    malformed = tmp_path / "malformed.csv"
    malformed.write_text("sku,title,color,kind,material\nS1,Mug,red,mug,clay\nS2,Cup,red,mug\n", encoding="utf-8")
    undefined = write_template(tmp_path / "undefined.j2", "{{ title }} in {{ colour_name }}")
    syntax = write_template(tmp_path / "syntax.j2", "{{ title }\n")
    size = write_template(tmp_path / "size.j2", "{{ title }}", "size: 1000x1000")
    preset = write_template(tmp_path / "preset.j2", "{{ title }}", "presets: [amazon]")
    return {
        "missing catalog": ([tmp_path / "nope.csv", "-t", WHITE], 2, ["nope.csv does not exist"]),
        "missing column": ([no_col, "-t", WHITE], 2, ["product_white.j2 uses {{ color }}", "nocolor.csv", "no column 'color'"]),
        "malformed row, strict": ([malformed, "-t", WHITE, "--strict"], 2, ["malformed.csv, line 3 (sku S2)", "4 fields but the header has 5"]),
        "undefined variable": ([good, "-t", undefined], 2, ["undefined.j2 uses {{ colour_name }}", "good.csv"]),
        "jinja syntax error": ([good, "-t", syntax], 2, ["syntax.j2, line 1: Jinja syntax error"]),
        "size not multiple of 16": ([good, "-t", size], 2, ["size.j2", "1000 is not a multiple of 16", "use 992 or 1008"]),
        "unknown preset": ([good, "-t", preset], 2, ["preset.j2", "unknown preset 'amazon'", "amazon_main"]),
        "bad --size": ([good, "-t", WHITE, "--size", "500x500"], 2, ["--size", "500 is not a multiple of 16"]),
        "unreachable model": ([good, "-t", WHITE, "--model", "Tongyi-MAI/Z-Image-Turbo"], 3, ["could not be loaded", "hf download"]),
        "missing model folder": ([good, "-t", WHITE, "--model", tmp_path / "models/zimage"], 2, ["zimage does not exist"]),
        "bad batch size": ([good, "-t", WHITE, "--batch-size", "0"], 2, ["--batch-size 0 is out of range"]),
        "bad --dest": ([good, "-t", WHITE, "--dest", "assets-bucket/catalog"], 4, ["--dest 'assets-bucket/catalog' is not an S3 URI", "s3://BUCKET/PREFIX"]),
        "fp8 on the CPU": ([good, "-t", WHITE, "--precision", "fp8"], 3, ["--precision fp8 needs an NVIDIA GPU with FP8 tensor cores", "Drop --precision fp8"]),
        "--vram too small": ([good, "-t", WHITE, "--vram", "8"], 2, ["--vram 8 is out of range: use 12..200"]),
    }


CASES = ["missing catalog", "missing column", "malformed row, strict", "undefined variable", "jinja syntax error",
         "size not multiple of 16", "unknown preset", "bad --size", "unreachable model", "missing model folder", "bad batch size",
         "bad --dest", "fp8 on the CPU", "--vram too small"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_a_clear_error_and_no_output(case, bad_inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    args, code, phrases = bad_inputs[case]
    out_dir = tmp_path / "out"
    got, stdout, stderr = run_cli(capsys, "run", *args, "--out", out_dir, "--device", "cpu", "-q")
    assert got == code, stderr
    assert stderr.startswith("error: ") and "Traceback" not in stderr
    for phrase in phrases:
        assert phrase in stderr, stderr
    assert not out_dir.exists()


@pytest.mark.parametrize("case", ["missing column", "jinja syntax error", "unknown preset"])
def test_plan_reports_the_same_errors(case, bad_inputs, capsys):
    args, code, phrases = bad_inputs[case]
    got, _, stderr = run_cli(capsys, "plan", *args)
    assert got == 2 and phrases[0] in stderr


def test_plan_writes_every_job_and_prints_samples(tmp_path, capsys):
    jobs = tmp_path / "plan/jobs.jsonl"
    code, out, _ = run_cli(capsys, "plan", CATALOGS / "demo.csv", "-t", WHITE, "-t", TEMPLATES / "poster_text.j2", "--jobs", jobs)
    assert code == 0 and "28 jobs from 14 rows x 2 template(s)" in out and "BTL-001" in out
    lines = [json.loads(line) for line in jobs.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 28 and {"job_id", "prompt", "seed"} <= set(lines[0])
    assert [p.name for p in jobs.parent.iterdir()] == ["jobs.jsonl"]


def test_plan_lists_row_problems_without_failing(tmp_path, capsys):
    cat = write_csv(tmp_path / "c.csv", ["sku", "title", "color", "kind", "material"],
                    [["S1", "Mug", "red", "mug", "clay"], ["S2", "Cup", "", "mug", "clay"]])
    code, out, err = run_cli(capsys, "plan", cat, "-t", WHITE)
    assert code == 0 and "1 jobs from 1 rows" in out
    assert "c.csv, line 3 (sku S2): column 'color' is empty" in err


def test_help_shows_real_examples(capsys):
    for command in (["--help"], ["run", "--help"], ["plan", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(command)
        assert exit_.value.code == 0
        assert "zimage-batch run catalogs/demo.csv --template templates/product_white.j2" in capsys.readouterr().out
    for command, example in ((["run", "--help"], "--c2pa-cert certs/chain.pem --c2pa-key certs/signer.key"),
                             (["verify", "--help"], "zimage-batch verify out/ --c2pa-trust certs/ca.pem"),
                             (["reproduce", "--help"], "zimage-batch reproduce out/ --job 3f9c2a1be0d4 --out repro/")):
        with pytest.raises(SystemExit) as exit_:
            main(command)
        assert exit_.value.code == 0 and example in capsys.readouterr().out


@pytest.mark.usefixtures("prefect_server")
def test_run_in_process_with_row_problems_and_summary(tmp_path, capsys):
    cat = write_csv(tmp_path / "c.csv", ["sku", "title", "color", "kind", "material"],
                    [["S1", "Mug", "red", "mug", "clay"], ["S2", "Cup", "", "mug", "clay"]])
    scene = write_template(tmp_path / "scene.j2", "{{ color }} {{ title }}", "size: 256x256")
    code, out, err = run_cli(capsys, "run", cat, "-t", scene, "--model", "tiny-random", "--device", "cpu", "--out", tmp_path / "o", "-q")
    assert code == 0, err
    assert "1 generated, 0 skipped" in out and "Manifest:" in out and "line 3 (sku S2): column 'color' is empty" in err
    run = json.loads((tmp_path / "o/run.json").read_text())
    assert run["row_problems"] == 1 and run["generated"] == 1


def test_the_installed_command_runs_end_to_end(tmp_path):
    """A real subprocess on Prefect's embedded server, as a user runs it."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    cmd = [str(Path(sys.executable).parent / "zimage-batch"), "run", str(CATALOGS / "demo.parquet"), "-t",
           str(TEMPLATES / "poster_text.j2"), "--model", "tiny-random", "--size", "256x256", "--limit", "3",
           "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "3 generated" in done.stdout and "Traceback" not in done.stderr and "database is locked" not in done.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert again.returncode == 0 and "0 generated, 3 skipped" in again.stdout


def test_a_closed_pipe_is_not_a_traceback(tmp_path):
    """`zimage-batch plan ... | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    rows = [[f"S{i}", "Mug", "red", "mug", "clay"] for i in range(3000)]  # ~1 MB of output: more than a pipe holds
    catalog = write_csv(tmp_path / "big.csv", ["sku", "title", "color", "kind", "material"], rows)
    cmd = f"'{Path(sys.executable).parent / 'zimage-batch'}' plan '{catalog}' -t '{WHITE}' --show 3000 | head -1"
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.stdout.count("\n") == 1


def test_an_output_path_that_cannot_be_made_is_refused_before_anything_runs(tmp_path, capsys):
    from PIL import Image

    good = write_csv(tmp_path / "good.csv", ["sku", "title", "color", "kind", "material"], [["S1", "Mug", "red", "mug", "clay"]])
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), "white").save(photo)
    (tmp_path / "afile").write_text("not a folder")
    for args in (["run", good, "-t", WHITE, "--model", "tiny-random", "--device", "cpu", "--out", tmp_path / "afile/out"],
                 ["postprocess", photo, "-p", "web", "--out", tmp_path / "afile/out"],
                 ["plan", good, "-t", WHITE, "--jobs", tmp_path / "afile/jobs.jsonl"]):
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and f"{tmp_path / 'afile'} is a file" in err and "Traceback" not in err, err
    code, _, err = run_cli(capsys, "plan", good, "-t", WHITE, "--jobs", tmp_path)
    assert code == 2 and "is a folder. Pass a file path" in err
    for _ in range(2):  # an existing jobs file is replaced
        code, _, err = run_cli(capsys, "plan", good, "-t", WHITE, "--jobs", tmp_path / "jobs.jsonl")
        assert code == 0, err
    (tmp_path / "jobs.jsonl").unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "good.csv", "photo.png"]  # no temp file left


def test_a_bad_cluster_address_is_named_and_leaves_no_output(tmp_path, capsys):
    import gc

    import distributed

    good = write_csv(tmp_path / "good.csv", ["sku", "title", "color", "kind", "material"], [["S1", "Mug", "red", "mug", "clay"]])
    gc.disable()  # as when no collection happens to run before the next Dask run in this process
    try:
        code, _, err = run_cli(capsys, "run", good, "-t", WHITE, "--model", "tiny-random", "--cluster", "not an address",
                               "--out", tmp_path / "out", "-q")
        with pytest.raises(ValueError, match="No global client"):  # no half-made Client left as the default one
            distributed.get_client()
    finally:
        gc.enable()
    assert code == 2 and "not a Dask scheduler address" in err and "tcp://HOST:PORT" in err
    assert not (tmp_path / "out").exists()


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("setting, dest, code, phrase", [
    ("PREFECT_API_URL=http://127.0.0.1:{port}/api", None, 2, "PREFECT_API_URL=http://127.0.0.1:{port}/api cannot be used"),
    ("AWS_ENDPOINT_URL=not-a-url", "s3://assets/catalog", 4, "AWS settings in this environment cannot be used"),
    ("AWS_PROFILE=no-such-profile", "s3://assets/catalog", 4, "AWS settings in this environment cannot be used"),
])
def test_a_bad_setting_in_the_environment_is_named_before_the_model_loads(setting, dest, code, phrase, tmp_path, capsys,
                                                                         monkeypatch):
    port = closed_port()
    name, value = setting.format(port=port).split("=", 1)
    monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    good = write_csv(tmp_path / "good.csv", ["sku", "title", "color", "kind", "material"], [["S1", "Mug", "red", "mug", "clay"]])
    extra = ["--dest", dest] if dest else []
    got, _, err = run_cli(capsys, "run", good, "-t", WHITE, "--model", "tiny-random", "--device", "cpu", *extra,
                          "--out", tmp_path / "out")
    assert got == code and phrase.format(port=port) in err and "Traceback" not in err, err
    assert "Loading model" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("prefect_server")
def test_a_run_with_a_problem_in_every_row_fails_and_a_catalog_line_that_cannot_be_read_leaves_nothing(tmp_path, capsys):
    cat = write_csv(tmp_path / "c.csv", ["sku", "title", "color", "kind", "material"],
                    [["S1", "Mug", "", "mug", "clay"], ["S2", "Cup", "", "mug", "clay"]])
    scene = write_template(tmp_path / "scene.j2", "{{ color }} {{ title }}", "size: 256x256")
    code, out, err = run_cli(capsys, "run", cat, "-t", scene, "--model", "tiny-random", "--device", "cpu", "--out", tmp_path / "o", "-q")
    assert code == 2 and "No job was planned: all 2 row(s) have problems" in err and "Manifest:" not in out
    from prefect.settings import PREFECT_API_URL

    broken = tmp_path / "broken.csv"
    broken.write_bytes(b"sku,title,color,kind,material\nS1,Mug,red,mug,clay\nS2,Caf\xe9,red,mug,clay\n")  # Latin-1 in row 2
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_LOGGING_LEVEL")  # the tests show Prefect's warnings; a user sees its defaults
    done = subprocess.run([str(Path(sys.executable).parent / "zimage-batch"), "run", str(broken), "-t", str(scene),
                           "--model", "tiny-random", "--device", "cpu", "--out", str(tmp_path / "b"), "-q"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 2 and "broken.csv: line 3 is not UTF-8" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "b").exists()  # no plan spool, no lock, no folder

    model = tmp_path / "models/broken"  # a pipeline folder without its weights: it fails to load, after planning
    model.mkdir(parents=True)
    (model / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}', encoding="utf-8")
    done = subprocess.run([str(Path(sys.executable).parent / "zimage-batch"), "run", str(CATALOGS / "demo.csv"), "-t", WHITE,
                           "--model", str(model), "--device", "cpu", "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 3 and "broken could not be loaded" in done.stderr and "complete diffusers" in done.stderr
    assert "Traceback" not in done.stderr and "loading" in done.stderr
    assert not (tmp_path / "m").exists()  # the plan's spool is removed


def test_a_batch_that_compiles_says_so_on_the_progress_bar(capsys):
    """On a fresh GPU machine the first batch of a shape compiles for ~50 s: the bar says why it waits."""
    from zimage_batch.progress import ProgressBar

    with ProgressBar(device="cuda") as bar:
        bar.on_event("compiling", "4 x 1024x1024")
        bar.on_event("compiled", 51.24)
    assert "Compiled for batches of 4 x 1024x1024 and made them in 51.2 s" in capsys.readouterr().err


@pytest.mark.usefixtures("prefect_server")
def test_the_model_loads_after_planning_and_only_when_there_is_something_to_make(tmp_path, capsys, monkeypatch):
    from zimage_batch import generate

    monkeypatch.setattr(generate, "_ENGINES", {})  # nothing loaded in this process yet, as in a fresh one
    rows = [[f"S{i}", f"Mug {i}", "red", "mug", "clay"] for i in range(3000)]
    deep = tmp_path / "deep.csv"
    deep.write_bytes(write_csv(tmp_path / "ok.csv", ["sku", "title", "color", "kind", "material"], rows).read_bytes()
                     + b"S9999,Caf\xe9 mug,red,mug,clay\n")  # Latin-1 on the last line, far past what the checks read
    code, _, err = run_cli(capsys, "run", deep, "-t", WHITE, "--model", "tiny-random", "--device", "cpu", "--out", tmp_path / "o")
    assert code == 2 and "deep.csv: line 3002 is not UTF-8" in err, err
    assert generate._ENGINES == {} and "Loaded" not in err and not (tmp_path / "o").exists()

    args = ["run", CATALOGS / "demo.csv", "-t", WHITE, "--model", "tiny-random", "--device", "cpu", "--size", "256x256",
            "--limit", "2", "--out", tmp_path / "o"]
    code, _, err = run_cli(capsys, *args)
    assert code in (0, 1) and "Loaded tiny-random on cpu in" in err, err
    monkeypatch.setattr(generate, "_ENGINES", {})
    code, out, err = run_cli(capsys, *args)  # nothing to make: no model is loaded
    assert code == 0 and "2 skipped" in out and "0 pipeline load(s)" in out and "Loaded" not in err
    assert "Still rejected: 2 job(s) rejected by earlier runs" in out  # tiny-random's noise has no white backdrop
    assert generate._ENGINES == {}


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_after_the_batch_in_progress_and_twice_at_once(presses, tmp_path):
    import signal
    import time

    from prefect.settings import PREFECT_API_URL

    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_LOGGING_LEVEL")
    args = [str(Path(sys.executable).parent / "zimage-batch"), "run", str(CATALOGS / "demo.csv"), "-t",
            str(TEMPLATES / "lifestyle_scene.j2"), "--size", "256x256", "--batch-size", "1", "--out", str(out)]
    run = subprocess.Popen([*args, "--model", "simulated:0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env, cwd=ROOT)  # 28 jobs of 0.5 s in one shard of 64
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("images/*/*/*.jpg")) and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(presses):
            run.send_signal(signal.SIGINT)
            time.sleep(0.2)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 130 and "press Ctrl-C again to stop at once" in err, err
    assert ("Stopped at once" in err) == (presses == 2)
    assert "Traceback" not in err and "terminate called" not in err
    made = [json.loads(line)["job_id"] for part in out.glob(".parts/*.jsonl") for line in part.read_text().splitlines()]
    assert 1 <= len(made) < 28  # the shard stopped early; what it finished is recorded
    done = subprocess.run([*args, "--model", "simulated:0", "-q"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0 and f"{28 - len(made)} generated, {len(made)} skipped" in done.stdout, done.stdout + done.stderr


@pytest.mark.usefixtures("prefect_server")
def test_an_interrupted_run_leaves_no_stop_flag_or_ctrl_c_handler_behind(tmp_path, capsys):
    import signal
    import threading
    import time

    from flows.catalog_images import run_catalog
    from zimage_batch.run import RunConfig
    from zimage_batch.shard import STOP

    out, before = tmp_path / "out", signal.getsignal(signal.SIGINT)

    def ctrl_c_after_the_first_image() -> None:
        deadline = time.monotonic() + 120
        while not list(out.glob("images/*/*/*.jpg")) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_after_the_first_image, daemon=True).start()
    code, _, err = run_cli(capsys, "run", CATALOGS / "demo.csv", "-t", TEMPLATES / "lifestyle_scene.j2", "--model",
                           "simulated:0.3", "--size", "256x256", "--batch-size", "1", "--out", out, "-q")
    assert code == 130 and "Stopping after the batch in progress" in err
    assert not STOP.is_set() and signal.getsignal(signal.SIGINT) is before and not list(out.glob(".zb-tmp-stop-*"))
    summary = run_catalog(RunConfig(catalogs=[str(CATALOGS / "demo.csv")], templates=[str(TEMPLATES / "lifestyle_scene.j2")],
                                    out=str(tmp_path / "api"), model="simulated:0", size="256x256", limit=4))
    assert summary.generated == 4  # an API run in the same process is not stopped by the earlier Ctrl-C


def test_plan_notes_turbo_settings_and_refuses_a_limit_below_one(tmp_path, capsys):
    cat = write_csv(tmp_path / "c.csv", ["sku", "title"], [["S1", "Mug"]])
    odd = write_template(tmp_path / "odd.j2", "{{ title }}", "steps: 2")
    code, out, err = run_cli(capsys, "plan", cat, "-t", odd, "--model", "Tongyi-MAI/Z-Image-Turbo")
    assert code == 0 and "1 jobs from 1 rows" in out and "note: " in err and "Z-Image-Turbo is distilled for 8" in err
    code, _, err = run_cli(capsys, "plan", cat, "-t", odd, "--limit", "0")
    assert code == 2 and "--limit 0 is out of range: use 1 or more." in err


@pytest.mark.usefixtures("prefect_server")
def test_a_run_says_how_many_prompts_were_too_long_for_the_text_encoder(tmp_path, capsys):
    cat = write_csv(tmp_path / "c.csv", ["sku", "title"], [["S1", "Mug"], ["S2", "A very long story about a mug " * 6]])
    template = write_template(tmp_path / "t.j2", "{{ title }}", "size: 256x256\nmax_sequence_length: 64")
    code, out, err = run_cli(capsys, "run", cat, "-t", template, "--model", "tiny-random", "--device", "cpu",
                             "--out", tmp_path / "o", "-q")
    assert code == 0 and "2 generated" in out
    assert "note: 1 job(s) had a prompt longer than its template's max_sequence_length tokens" in err
    assert json.loads((tmp_path / "o/run.json").read_text())["prompts_cut"] == 1
