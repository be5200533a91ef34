"""The benchmarks run (tiny sizes), so they cannot rot."""

import json
import subprocess
import sys

from conftest import ROOT


def test_throughput_benchmark_runs_on_the_cpu(tmp_path):
    from bench import throughput

    result = throughput.main(["--tiny", "--images", "2", "--batch", "2", "--out", str(tmp_path / "t.json")])
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"plain", "engine", "engine+compile", "vram16"}
    assert all("error" not in r and r["s_per_image"] > 0 for r in rows.values()), rows
    assert rows["vram16"]["max_abs_diff"] <= 1  # batch 1 through the engine matches the plain loop
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == result["rows"]


def test_plan_stream_benchmark_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.plan_stream", "--rows", "2000"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2,000 rows x 2 templates -> 4,000 jobs" in done.stdout


def test_incremental_benchmark_runs(tmp_path):
    from bench import incremental

    result = incremental.main(["--jobs", "300", "--folder", str(tmp_path / "b")])
    assert result["jobs"] == 300 and result["size+mtime"] > 0 and result["verify-files (SHA-256)"] > 0
