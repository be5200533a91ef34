"""Shared fixtures: an isolated model cache, a session Prefect server, catalogs and a recording engine."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
CATALOGS = ROOT / "catalogs"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Build the tiny pipeline into a per-session cache, not the user's."""
    path = tmp_path_factory.mktemp("zimage-cache")
    os.environ["ZIMAGE_BATCH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the session (starting one takes ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Each test runs in its own folder, so relative outputs never land in the repo."""
    monkeypatch.chdir(tmp_path)


def write_csv(path: Path, header: list[str], rows: list[list[str]], *, bom: bool = False) -> Path:
    """Write a small CSV catalog."""
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_template(path: Path, body: str, front: str | None = None) -> Path:
    """Write a template file with optional front matter."""
    text = (f"---\n{front.strip()}\n---\n" if front is not None else "") + body
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def small_catalog(tmp_path) -> Path:
    return write_csv(
        tmp_path / "small.csv",
        ["sku", "title", "color", "kind", "material", "price"],
        [
            ["A-1", "Steel bottle", "navy", "bottle", "steel", "10"],
            ["B/2", "咖啡杯", "white", "mug", "ceramic", "12"],
            ["C 3", "Runner", "coral", "sneaker", "mesh", "80"],
        ],
    )


@pytest.fixture
def scene_template(tmp_path) -> Path:
    return write_template(tmp_path / "scene.j2", "A {{ color }} {{ kind }} called {{ title }} in a sunny kitchen.",
                          "size: 256x256\npresets: [web]\nbackground: scene")


def product_on_white(size: int = 256, seed: int = 0) -> np.ndarray:
    """A synthetic product shot: a dark rounded block on an off-white backdrop, float RGB in [0, 1]."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 246 / 255, dtype=np.float32)
    a, b = size // 4, size * 3 // 4
    image[a:b, a + size // 8 : b - size // 8] = np.array([0.15, 0.25, 0.5], dtype=np.float32) + rng.uniform(-0.02, 0.02, 3)
    return image


class RecordingEngine:
    """A stand-in for ``generate.Engine`` that records each call and returns images from ``make``.

    ``make(job, seed, call_index)`` returns a float HxWx3 array, or raises.
    """

    def __init__(self, make, device: str = "cpu"):
        from zimage_batch.generate import EngineOptions

        self.make = make
        self.device = device
        self.load_id = "recording:0"
        self.load_seconds = 0.0
        self.options = EngineOptions()
        self.calls: list[list[tuple[str, int]]] = []
        self.prepared: list[str] = []

    def prepare(self, jobs):
        self.prepared.extend(j.job_id for j in jobs)

    def release(self):
        pass

    def batch_key(self, job):
        return job.batch_key()

    def caption_tokens(self, job):
        return len(job.prompt)

    def generate(self, jobs, seeds):
        self.calls.append([(j.job_id, s) for j, s in zip(jobs, seeds)])
        return [self.make(j, s, len(self.calls) - 1) for j, s in zip(jobs, seeds)]
