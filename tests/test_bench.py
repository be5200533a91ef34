"""The benchmarks run (tiny sizes), so they cannot rot."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def test_throughput_benchmark_runs_on_the_cpu(tmp_path):
    from bench import throughput

    levered = ["engine+compile+complex-rope", "engine+compile+eager-vae", "engine+compile@1", "engine+compile+varied",
               "profile+eager-vae"]
    result = throughput.main(["--tiny", "--images", "2", "--batch", "2", "--out", str(tmp_path / "t.json"), "--variants",
                              ",".join([*reversed(throughput.ORDER), *levered])])
    rows = {r["variant"]: r for r in result["rows"]}
    # The documented order: a variant with levers or a workload in its base's place.
    order = [*throughput.ORDER[:4], *levered[:4], *throughput.ORDER[4:7], "profile+eager-vae", *throughput.ORDER[7:]]
    assert [r["variant"] for r in result["rows"]] == order
    assert rows["fp8"]["skipped"].startswith("fp8 needs a CUDA GPU") and "skipped" in rows["cold-start"]
    assert rows["sdpa"]["default_tflops"] > 0 and rows["sdpa"]["matmul_tflops"] > 0
    profile = rows["profile"]  # one batch under torch.profiler (aten ops' own CPU time here)
    assert {"matmul", "attention", "convolution (VAE)"} <= set(profile["kinds_s_per_image"])
    assert 0 < profile["busy_s_per_image"] <= profile["wall_s_per_image"]
    assert sum(profile["kinds_s_per_image"].values()) >= profile["busy_s_per_image"] * 0.99  # the union is no more than the sum
    assert (tmp_path / "profile-trace.json.gz").stat().st_size > 0
    assert (tmp_path / "profile-eager-vae-trace.json.gz").stat().st_size > 0  # a name the device's $OUT gives back
    measured = {name: row for name, row in rows.items() if name not in ("sdpa", "profile", "profile+eager-vae", "fp8", "cold-start")}
    assert all("error" not in r and r["s_per_image"] > 0 and r["steady_s_per_image"] > 0 for r in measured.values()), rows
    for name, split in measured.items():  # device time split into transformer forwards and VAE decodes
        if name != "plain":
            assert 0 < split["transformer_s_per_image"] and 0 < split["vae_decode_s_per_image"]
            assert split["transformer_s_per_image"] + split["vae_decode_s_per_image"] < split["in_generate_s_per_image"]
            assert split["in_generate_s_per_image"] <= split["sustained_s_per_image"]
    assert rows["engine+compile@1"]["batch"] == 1 and rows["engine+compile@1"]["generate_calls"] == 2
    for key in ("max_abs_diff", "mean_abs_diff", "psnr_db"):  # the real rotation leaves the images as they were
        assert rows["engine+compile+complex-rope"][key] == rows["engine+compile"][key]
    assert "psnr_db" not in rows["engine+compile+varied"]  # other prompts than the plain loop's: not compared
    assert rows["vram16"]["max_abs_diff"] <= 1  # batch 1 and a streamed text encoder: the plain loop's images
    assert 35 < rows["vram12"]["psnr_db"] < float("inf")  # int8 weights: close to, not equal to, the plain images
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == result["rows"]


def test_variant_names_say_the_levers_taken_out_the_workload_and_the_batch():
    from bench.variants import VARIANT_SETS, Variant, parse_variant

    assert parse_variant("engine+compile+complex-rope+eager-vae@8") == Variant("engine+compile", ("complex-rope", "eager-vae"), 8)
    assert parse_variant("fp8+eager-vae") == Variant("fp8", ("eager-vae",))
    assert parse_variant("engine+compile+mask+varied") == Variant("engine+compile+mask", ("varied",))
    assert parse_variant("engine+compile+mask") == Variant("engine+compile+mask")  # a base, not a lever

    assert all(parse_variant(name) for names in VARIANT_SETS.values() for name in names.split(","))  # sets name variants
    assert all(parse_variant(name) is None for name in VARIANT_SETS)  # a set's name never hides a variant's
    for name in ("engine+compile+fused", "fp8+tensorwise", "fp8+varied", "profile+varied", "plain+eager-vae",  # dropped or meaningless
                 "engine+compile@0", "vram16@2", "engine+compile+turbo"):
        assert parse_variant(name) is None, name


def test_varied_jobs_make_two_caption_buckets_and_partial_batches_at_the_gpu_defaults():
    from bench.throughput import bench_jobs, varied_jobs
    from zimage_batch.generate import load_engine
    from zimage_batch.shard import batches

    engine = load_engine("tiny-random", "cpu")  # the same byte-level tokenizer as the full-size random weights
    for batch in (4, 8):  # the GPU run's defaults: 16 timed jobs after --batch 4 warm-up ones
        jobs = varied_jobs(bench_jobs(16 + batch, "1024x1024", 8, 96))[4:20]
        tokens = [engine.caption_tokens(j) for j in jobs]
        assert 72 <= min(tokens) and max(tokens) <= 110 and len({j.max_sequence_length for j in jobs}) == 1
        sizes = [len(group) for group in batches(jobs, batch, engine.batch_key, engine.caption_tokens)]
        assert sorted(sizes) != [batch] * (16 // batch) and sum(sizes) == 16, sizes  # some batch is partial


def test_variants_are_set_against_their_base_of_the_same_run():
    from bench.throughput import against_base

    rows = [{"variant": "plain", "steady_s_per_image": 1.4}, {"variant": "engine+compile", "sustained_s_per_image": 0.8},
            {"variant": "engine+compile+eager-vae@8", "sustained_s_per_image": 0.78}, {"variant": "fp8", "sustained_s_per_image": 0.6},
            {"variant": "vram16", "sustained_s_per_image": 0.9}]
    assert against_base(rows) == ["engine+compile+eager-vae@8: 0.780 s per image vs engine+compile 0.800 s (-2.5%)"]


def test_levers_come_out_for_a_pass_and_go_back_even_when_it_fails():
    from bench.variants import levers
    from zimage_batch.blocks import use_real_rope
    from zimage_batch.generate import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    use_real_rope(pipe.transformer)
    pipe.vae.decoder.compile()  # lazy: nothing compiles until it is called
    compiled = pipe.vae.decoder._compiled_call_impl

    def processors():
        return {type(m.processor).__name__ for m in pipe.transformer.modules() if hasattr(m, "processor")}

    with pytest.raises(RuntimeError, match="pass failed"):
        with levers(pipe, ("complex-rope", "eager-vae")):
            assert processors() == {"ZSingleStreamAttnProcessor"} and pipe.vae.decoder._compiled_call_impl is None
            raise RuntimeError("pass failed")
    assert processors() == {"RealRopeAttnProcessor"} and pipe.vae.decoder._compiled_call_impl is compiled


def test_gpu_monitor_samples_the_card_torch_uses_and_keeps_what_it_can_read(tmp_path, monkeypatch):
    import time

    from bench.measure import GpuMonitor

    tool = tmp_path / "nvidia-smi"  # answers as `nvidia-smi -i ID --query-gpu=clocks.sm,temperature.gpu,power.draw` does
    tool.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'asked'}\ncat {tmp_path / 'reading'}\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    (tmp_path / "reading").write_text("1755, 61, 612.40\n")
    with GpuMonitor("GPU-1234", period=0.02) as gpu:
        time.sleep(0.2)
    assert gpu.summary() == pytest.approx({"gpu_sm_mhz_mean": 1755.0, "gpu_sm_mhz_min": 1755.0, "gpu_temp_c_max": 61.0,
                                           "gpu_power_w_mean": 612.4})  # a mean of several readings
    assert (tmp_path / "asked").read_text().startswith("-i GPU-1234 --query-gpu=clocks.sm,temperature.gpu,power.draw")
    (tmp_path / "reading").write_text("1410, 70, [N/A]\n")  # a card without a power reading keeps its clock
    with GpuMonitor("GPU-1234", period=0.02) as gpu:
        time.sleep(0.1)
    assert gpu.summary() == {"gpu_sm_mhz_mean": 1410.0, "gpu_sm_mhz_min": 1410.0, "gpu_temp_c_max": 70.0}
    (tmp_path / "reading").write_text("No devices were found\n")
    with GpuMonitor("GPU-1234", period=0.02) as gpu:
        time.sleep(0.1)
    assert gpu.summary() == {}
    with GpuMonitor(None) as gpu:  # the CPU: never starts
        assert gpu._thread is None and gpu.summary() == {}


def test_throughput_benchmark_names_what_it_does_not_know(capsys):
    from bench import throughput

    for wrong in ("plain+eager-vae", "engine+compile+cudnn", "plain@2", "vram16@4", "engine+compile@0", "engine@x",
                  "engine+compile@", "@8", "engine@²"):
        with pytest.raises(SystemExit) as exit_:
            throughput.main(["--tiny", "--variants", wrong])
        assert exit_.value.code == 2 and wrong in capsys.readouterr().err


def test_throughput_benchmark_stops_starting_variants_past_its_budget(tmp_path):
    from bench import throughput

    result = throughput.main(["--tiny", "--images", "2", "--batch", "2", "--out", str(tmp_path / "t.json"),
                              "--variants", "plain,vram16", "--budget", "0"])
    assert [r.get("skipped", "")[:11] for r in result["rows"]] == ["not started", "not started"]


def test_plan_stream_benchmark_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.plan_stream", "--rows", "2000"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2,000 rows x 2 templates -> 4,000 jobs" in done.stdout


def test_incremental_benchmark_runs(tmp_path):
    from bench import incremental

    result = incremental.main(["--jobs", "300", "--folder", str(tmp_path / "b")])
    assert result["jobs"] == 300 and result["size+mtime"] > 0 and result["verify-files (SHA-256)"] > 0


def test_finisher_benchmark_runs():
    from bench import finisher

    result = finisher.main(["--size", "256", "--images", "8", "--ops", "2000"])
    assert result["bench_job_s"] > 0 and result["catalog_job_s"] > 0 and result["launch_slowdown"] > 0
    assert 0 < result["between_calls_s_per_image"] < 0.1  # two batches of 4: one gap, the GPU thread's own work


def test_scaling_benchmark_runs_without_dask(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.scaling", "--local", "--seconds-per-image", "0.05",
                           "--images-per-worker", "8", "--shard-size", "4"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no Dask:" in done.stdout and '"images": 8' in done.stdout and '"failed": 0' in done.stdout
