"""Nightly runs over a changing catalog: only new or changed products are made; removed ones are reported."""

import json
from pathlib import Path

import pytest

from conftest import write_csv, write_template
from zimage_batch import progress
from zimage_batch.manifest import read_jsonl
from zimage_batch.run import RunConfig

pytestmark = pytest.mark.usefixtures("prefect_server")
HEADER = ["sku", "title", "color", "price"]
YESTERDAY = [["A", "Steel bottle", "navy", "10"], ["B", "Mug", "white", "12"], ["C", "Lamp", "brass", "40"],
             ["D", "Tote", "green", "25"]]


def nightly(config) -> tuple[object, list[str]]:
    """Run the flow; return its summary and the skus of the images it made."""
    from flows.catalog_images import run_catalog

    made = []
    with progress.listening(lambda event, value: made.append(value.sku) if event == "record" else None):
        summary = run_catalog(config)
    return summary, sorted(made)


def test_only_new_and_changed_products_are_made_and_removed_ones_are_reported(tmp_path):
    template = write_template(tmp_path / "shot.j2", "A {{ color }} {{ title }} on a table",
                              "size: 256x256\npresets: [web]\nbackground: scene\nvariants: 2")
    catalog = tmp_path / "products.csv"
    write_csv(catalog, HEADER, YESTERDAY)
    config = RunConfig(catalogs=[str(catalog)], templates=[str(template)], out=str(tmp_path / "out"),
                       model="simulated:0", device="cpu", shard_size=3)
    first, made = nightly(config)
    assert made == ["A", "A", "B", "B", "C", "C", "D", "D"] and first.removed == []
    out = Path(config.out)
    before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.jpg")}

    today = [["A", "Steel bottle XL", "navy", "10"],  # a used field changed: both variants again
             ["B", "Mug", "white", "9.99"],  # an unused field changed: nothing to do
             ["D", "Tote", "green", "25"],  # C was removed
             ["E", "Kettle", "red", "30"]]  # new
    write_csv(catalog, HEADER, today)
    second, made = nightly(config)
    assert made == ["A", "A", "E", "E"]
    assert (second.planned, second.generated, second.skipped, second.removed) == (8, 4, 4, ["C"])
    run = json.loads((out / "run.json").read_text())
    assert run["removed"] == ["C"]
    assert "C</code>" in (out / "report.html").read_text() and "1 product(s) removed" in (out / "report.html").read_text()
    assert all(p.exists() for p in before)  # nothing deleted: C's and the old A's images stay
    untouched = {p: m for p, m in before.items() if p.parts[-3] in ("B", "D")}
    assert len(untouched) == 4 and all(p.stat().st_mtime_ns == m for p, m in untouched.items())
    records = read_jsonl(out / "manifest.jsonl")
    assert sorted(r["sku"] for r in records) == ["A"] * 4 + ["B", "B", "C", "C", "D", "D", "E", "E"]

    third, made = nightly(config)  # the same catalog again: nothing to do, C still reported
    assert made == [] and (third.skipped, third.removed) == (8, ["C"])

    import pyarrow.parquet as pq

    rows = pq.read_table(out / "manifest.parquet", columns=["job_id", "sku", "prompt", "current"]).to_pylist()
    current = sorted((r["sku"], r["prompt"]) for r in rows if r["current"])
    assert current == sorted([("A", "A navy Steel bottle XL on a table")] * 2 + [("B", "A white Mug on a table")] * 2
                             + [("D", "A green Tote on a table")] * 2 + [("E", "A red Kettle on a table")] * 2)
    assert sorted(r["sku"] for r in rows if not r["current"]) == ["A", "A", "C", "C"]  # the old A and the removed C

    def flags() -> dict[str, bool | None]:
        return {r["job_id"]: r["current"] for r in pq.read_table(out / "manifest.parquet", columns=["job_id", "current"]).to_pylist()}

    full = flags()
    limited, _ = nightly(config.model_copy(update={"limit": 2}))  # a partial plan says nothing new about what is current
    assert limited.skipped == 2 and flags() == full
    other = write_template(tmp_path / "other.j2", "A {{ title }} in a studio", "size: 256x256\npresets: [web]")
    alone, made = nightly(config.model_copy(update={"templates": [str(other)]}))  # another template, run alone
    assert len(made) == 4 and {j: f for j, f in flags().items() if j in full} == full  # shot.j2's images keep their flags
    write_csv(catalog, HEADER, [])  # tonight's export came out empty: it must not make every image old
    empty, _ = nightly(config)
    assert empty.planned == 0 and {j: f for j, f in flags().items() if j in full} == full
