"""The benchmarks run (tiny sizes), so they cannot rot."""

import json
import subprocess
import sys

from conftest import ROOT


def test_throughput_benchmark_runs_on_the_cpu(tmp_path):
    from bench import throughput

    result = throughput.main(["--tiny", "--images", "2", "--batch", "2", "--out", str(tmp_path / "t.json"), "--variants",
                              ",".join(throughput.ORDER)])
    rows = {r["variant"]: r for r in result["rows"]}
    assert [r["variant"] for r in result["rows"]] == throughput.ORDER  # every variant, in the documented order
    assert rows["fp8"]["skipped"].startswith("fp8 needs a CUDA GPU") and "skipped" in rows["cold-start"]
    measured = {name: row for name, row in rows.items() if name not in ("fp8", "cold-start")}
    assert all("error" not in r and r["s_per_image"] > 0 and r["steady_s_per_image"] > 0 for r in measured.values()), rows
    split = rows["generate-only"]  # device time split into transformer forwards and VAE decodes
    assert 0 < split["transformer_s_per_image"] and 0 < split["vae_decode_s_per_image"]
    assert split["transformer_s_per_image"] + split["vae_decode_s_per_image"] < split["in_generate_s_per_image"]
    assert "transformer_s_per_image" not in rows["engine+compile"]  # timed only where asked, then unwrapped
    assert rows["vram16"]["max_abs_diff"] <= 1  # batch 1 and a streamed text encoder: the plain loop's images
    assert 35 < rows["vram12"]["psnr_db"] < float("inf")  # int8 weights: close to, not equal to, the plain images
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == result["rows"]


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

    result = finisher.main(["--size", "256", "--images", "2", "--ops", "2000"])
    assert result["bench_job_s"] > 0 and result["catalog_job_s"] > 0 and result["launch_slowdown"] > 0


def test_scaling_benchmark_runs_without_dask(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.scaling", "--local", "--seconds-per-image", "0.05",
                           "--images-per-worker", "8", "--shard-size", "4"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no Dask:" in done.stdout and '"images": 8' in done.stdout and '"failed": 0' in done.stdout
