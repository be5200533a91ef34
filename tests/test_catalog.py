import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import CATALOGS, write_csv
from zimage_batch.catalog import Catalog, Row, RowProblem
from zimage_batch.errors import CatalogError


def test_demo_catalogs_have_twelve_mixed_products():
    for name in ("demo.csv", "demo.parquet"):
        rows = list(Catalog(CATALOGS / name).rows())
        assert all(isinstance(r, Row) for r in rows)
        assert len(rows) >= 12
        kinds = {r.values["kind"] for r in rows}
        assert {"bottle", "mug", "sneaker", "phone", "tea box", "t-shirt"} <= kinds
        assert any(any("\u4e00" <= ch <= "\u9fff" for ch in r.values["title_zh"]) for r in rows)


def test_csv_with_and_without_bom_read_the_same(tmp_path):
    rows = [["S1", "杯子"], ["S2", "mug"]]
    plain = write_csv(tmp_path / "plain.csv", ["sku", "title"], rows)
    bom = write_csv(tmp_path / "bom.csv", ["sku", "title"], rows, bom=True)
    assert (tmp_path / "bom.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    a, b = Catalog(plain), Catalog(bom)
    assert a.columns == b.columns == ["sku", "title"]
    assert [r.values for r in a.rows()] == [r.values for r in b.rows()]


def test_rows_keep_source_and_number_and_drop_empty_values(tmp_path):
    path = write_csv(tmp_path / "c.csv", ["sku", "title", "color"], [["S1", "Mug", ""], ["S2", "Cup", "red"]])
    rows = list(Catalog(path).rows())
    assert [(r.catalog, r.row) for r in rows] == [(str(path), 1), (str(path), 2)]
    assert rows[0].values == {"sku": "S1", "title": "Mug"}


def test_malformed_row_is_reported_with_its_row_and_line_and_others_still_read(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('sku,title\nS1,"multi\nline title"\nS2,a,b\nS3,ok\n,no sku\n', encoding="utf-8")
    items = list(Catalog(path).rows())
    assert isinstance(items[0], Row) and items[0].values["title"] == "multi\nline title"
    assert isinstance(items[1], RowProblem) and items[1].row == 2
    assert "3 fields but the header has 2" in items[1].message and "line 4" in items[1].message
    assert isinstance(items[2], Row) and items[2].sku == "S3" and items[2].row == 3
    assert isinstance(items[3], RowProblem) and "sku" in items[3].message and items[3].row == 4


def test_parquet_is_read_in_batches(tmp_path):
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"sku": [f"S{i}" for i in range(2500)], "price": list(range(2500))}), path, row_group_size=1000)
    batches = list(Catalog(path).batches(size=1000))
    assert [len(b) for b in batches] == [1000, 1000, 500]
    assert batches[2][-1].row == 2500 and batches[2][-1].values == {"sku": "S2499", "price": 2499}


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("missing.csv", None, "does not exist"),
        ("cat.xlsx", b"x", "unknown file type"),
        ("nosku.csv", b"title,color\nMug,red\n", "no 'sku' column"),
        ("empty.csv", b"", "is empty"),
        ("dupe.csv", b"sku,title,title\nS1,a,b\n", "more than once"),
        ("blank.csv", b"sku,,title\nS1,a,b\n", "have no name"),
        ("gbk.csv", "sku,标题\nS1,杯\n".encode("gbk"), "not UTF-8"),
        ("broken.parquet", b"PAR1 not really", "not a readable Parquet"),
    ],
)
def test_bad_catalogs_raise_clear_errors(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CatalogError) as err:
        Catalog(path)
    assert expected in str(err.value) and name in str(err.value)


def test_non_utf8_body_names_the_line(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_bytes(b"sku,title\nS1,ok\nS2," + "杯".encode("gbk") + b"\n")
    with pytest.raises(CatalogError, match="line 3 is not UTF-8"):
        list(Catalog(path).rows())


def test_a_glob_expands_to_its_files_in_name_order_and_plans_them_all(tmp_path, monkeypatch):
    from zimage_batch.catalog import expand_sources
    from zimage_batch.plan import check_inputs, plan_jobs
    from zimage_batch.postprocess import PRESETS
    from conftest import write_template

    folder = tmp_path / "catalogs"
    folder.mkdir()
    write_csv(folder / "b.csv", ["sku", "title"], [["B1", "Mug"]])
    write_csv(folder / "a.csv", ["sku", "title"], [["A1", "Cup"], ["A2", "Lamp"]])
    (folder / "notes.txt").write_text("not a catalog")
    monkeypatch.chdir(tmp_path)
    assert expand_sources(["catalogs/*"]) == (["catalogs/a.csv", "catalogs/b.csv"], [])
    assert expand_sources(["catalogs/a.csv", "catalogs/*.csv"]) == (["catalogs/a.csv", "catalogs/b.csv"], [])
    paths, problems = expand_sources(["nowhere/*.csv"])
    assert paths == [] and "'nowhere/*.csv' matches no .csv or .parquet file" in problems[0]
    template = write_template(tmp_path / "t.j2", "{{ title }}")
    jobs = list(plan_jobs(check_inputs(["catalogs/*.csv"], [str(template)], "simulated:0", PRESETS)))
    assert [(j.catalog, j.sku) for j in jobs] == [("catalogs/a.csv", "A1"), ("catalogs/a.csv", "A2"), ("catalogs/b.csv", "B1")]


def test_a_url_catalog_other_than_s3_is_a_clear_error():
    with pytest.raises(CatalogError, match=r"https://example.com/p.parquet: reading catalogs from a URL \(https://\) is not supported"):
        Catalog("https://example.com/p.parquet")
