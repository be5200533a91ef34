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
    assert "3 fields but the header has 2" in items[1].message and items[1].line == 4  # the multi-line row took 2-3
    assert str(items[1]).startswith(f"{path}, line 4 (sku S2): the row has 3 fields")
    assert isinstance(items[2], Row) and items[2].sku == "S3" and items[2].row == 3
    assert isinstance(items[3], RowProblem) and "sku" in items[3].message and items[3].row == 4
    assert str(items[3]).startswith(f"{path}, line 6: the 'sku' column is empty")  # no sku to name


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


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_an_unclosed_quote_stops_planning_and_names_the_line_it_opened_on(tmp_path):
    from conftest import write_template
    from zimage_batch.plan import check_inputs, plan_jobs
    from zimage_batch.postprocess import PRESETS

    rows = [f"S{i},Mug {i},blue,mug" for i in range(1, 300)]
    rows[1] = 'S2,"Laptop sleeve 14in,red,mug'  # data row 2, line 3: it used to swallow the 297 rows after it
    path = _write_lines(tmp_path / "quote.csv", ["sku,title,color,kind", *rows])
    template = write_template(tmp_path / "t.j2", "{{ title }}")
    with pytest.raises(CatalogError) as err:
        list(plan_jobs(check_inputs([str(path)], [str(template)], "simulated:0", PRESETS)))
    message = str(err.value)
    assert "quote.csv: the quoted value that opens on line 3 (data row 2) is never closed: it runs to the end of the file (line 300)" in message
    assert 'Close the quote, or double a quote inside a quoted value ("")' in message


def test_an_unclosed_quote_closed_by_a_later_quote_is_caught_by_the_field_count(tmp_path):
    path = _write_lines(tmp_path / "later.csv", ["sku,title,color", "S1,Mug,red", 'S2,"Cup,red', "S3,Lamp,red", 'S4,"Vase",red'])
    with pytest.raises(CatalogError) as err:
        list(Catalog(path).rows())
    message = str(err.value)
    assert "later.csv: the quoted value that opens on line 3 (data row 2) runs on to line 5" in message
    assert "the quote is most likely not closed" in message and "fields where the header" not in message


def test_a_multi_line_row_with_the_wrong_field_count_is_a_row_problem_as_on_one_line(tmp_path):
    path = _write_lines(tmp_path / "count.csv", ["sku,title,color", "S1,Mug,red", 'S2,"Cup', 'and saucer"', "S3,Lamp,blue"])
    items = list(Catalog(path).rows())
    assert [i.sku for i in items if not isinstance(i, RowProblem)] == ["S1", "S3"]
    (problem,) = [i for i in items if isinstance(i, RowProblem)]
    assert problem.row == 2 and "2 fields" in problem.message and problem.line == 3  # named by the line it starts on


def test_an_unclosed_quote_that_keeps_the_field_count_is_caught_at_the_end_of_the_file(tmp_path):
    path = _write_lines(tmp_path / "end.csv", ["sku,title", "S1,Mug", "S2,Cup", 'S3,"Lamp', "S4,Vase", "S5,Bowl"])
    with pytest.raises(CatalogError) as err:
        list(Catalog(path).rows())
    assert "end.csv: the quoted value that opens on line 4 (data row 3) is never closed: it runs to the end of the file (line 6)" in str(err.value)


def test_the_error_names_the_unclosed_quote_not_an_earlier_multi_line_value(tmp_path):
    path = tmp_path / "two.csv"
    path.write_text('sku,title,note\nS1,"two\nlines","open\nS2,a,b\nS3,c,d\n', encoding="utf-8")
    with pytest.raises(CatalogError, match=r"opens on line 3 \(data row 1\) is never closed"):
        list(Catalog(path).rows())


def test_legit_multi_line_quoted_values_and_doubled_quotes_still_read(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('sku,title,color\r\nS1,"Mug\r\nwith ""handle"", 12oz",red\r\n\r\nS2,"a,b\nc\nd",blue\r\nS3,Cup,\r\n',
                    encoding="utf-8")
    rows = list(Catalog(path).rows())
    assert [(r.row, r.values) for r in rows] == [
        (1, {"sku": "S1", "title": 'Mug\r\nwith "handle", 12oz', "color": "red"}),
        (2, {"sku": "S2", "title": "a,b\nc\nd", "color": "blue"}),
        (3, {"sku": "S3", "title": "Cup"}),
    ]


def test_a_single_line_row_with_the_wrong_field_count_is_still_only_a_row_problem(tmp_path):
    path = _write_lines(tmp_path / "c.csv", ["sku,title,color", "S1,Mug", "S2,Cup,red"])
    items = list(Catalog(path).rows())
    assert isinstance(items[0], RowProblem) and "line 2 (sku S1)" in str(items[0]) and items[0].sku == "S1"
    assert isinstance(items[1], Row) and items[1].sku == "S2"


def test_the_cli_prints_an_unclosed_quote_as_a_clean_error(tmp_path, capsys):
    from conftest import write_template
    from zimage_batch.cli import main

    path = _write_lines(tmp_path / "quote.csv", ["sku,title", "S1,Mug", 'S2,"Cup', "S3,Lamp"])
    template = write_template(tmp_path / "t.j2", "{{ title }}")
    code = main(["plan", str(path), "-t", str(template), "--model", "simulated:0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: Catalog ") and "opens on line 3 (data row 2) is never closed" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "column, type_name",
    [
        (pa.array([["a", "b"]]), "list<"),
        (pa.array([{"r": 1}]), "struct<"),
        (pa.array([[("r", 1)]], pa.map_(pa.string(), pa.int64())), "map<"),
        (pa.array([b"\xff\xfe"]), "binary"),
        (pa.array([b"\xff\xfe"]).dictionary_encode(), "dictionary<values=binary"),
    ],
)
def test_parquet_columns_without_text_are_refused_where_a_template_uses_them(tmp_path, column, type_name):
    from conftest import write_template
    from zimage_batch.errors import PlanError
    from zimage_batch.plan import check_inputs, plan_jobs
    from zimage_batch.postprocess import PRESETS

    path = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"sku": ["S1"], "title": ["Mug"], "extra": column}), path)
    assert list(Catalog(path).not_text) == ["extra"]
    unused = write_template(tmp_path / "unused.j2", "A {{ title }}")
    [job] = plan_jobs(check_inputs([str(path)], [str(unused)], "tiny-random", PRESETS))  # tags, thumbnails: fine unused
    assert job.prompt == "A Mug"
    used = write_template(tmp_path / "used.j2", "A {{ title }} with {{ extra }}")
    with pytest.raises(PlanError) as err:
        check_inputs([str(path)], [str(used)], "tiny-random", PRESETS)
    message = str(err.value)
    assert f"used.j2 uses extra. Catalog {path}: column(s) 'extra' ({type_name}" in message
    assert "Flatten each to a text column" in message and "'title'" not in message
    pq.write_table(pa.table({"sku": column, "title": ["Mug"]}), path)
    with pytest.raises(CatalogError, match=r"column\(s\) 'sku'"):
        Catalog(path)


def test_parquet_nan_is_missing_and_whole_floats_read_as_integers(tmp_path):
    path = tmp_path / "pandas.parquet"
    nan = float("nan")
    pq.write_table(pa.table({
        "sku": [1002.0, 1003.0, nan],
        "seed": [5.0, nan, 7.0],
        "weight": [0.5, 2.0, 1.25],
        "title": ["Mug", "Cup", "Lamp"],
    }), path)
    items = list(Catalog(path).rows())
    assert items[0].values == {"sku": 1002, "seed": 5, "weight": 0.5, "title": "Mug"} and items[0].sku == "1002"
    assert items[1].values == {"sku": 1003, "weight": 2.0, "title": "Cup"}  # only sku and seed name things
    assert isinstance(items[1].values["weight"], float)
    assert isinstance(items[2], RowProblem) and "'sku' column is empty" in items[2].message


def test_parquet_whole_floats_give_the_prompt_and_seed_the_user_wrote(tmp_path):
    from conftest import write_template
    from zimage_batch.plan import check_inputs, plan_jobs
    from zimage_batch.postprocess import PRESETS

    path = tmp_path / "pandas.parquet"
    pq.write_table(pa.table({"sku": [1002.0], "seed": [5.0], "color": [float("nan")]}), path)
    template = write_template(tmp_path / "t.j2", "product {{ sku }}{% if color is defined %} in {{ color }}{% endif %}")
    [job] = plan_jobs(check_inputs([str(path)], [str(template)], "simulated:0", PRESETS))
    assert (job.sku, job.prompt, job.seed) == ("1002", "product 1002", 5)


@pytest.mark.parametrize("separator, named", [(";", "';'"), ("\t", "tabs"), ("|", "'|'")])
def test_a_csv_with_another_separator_gets_a_hint(tmp_path, separator, named):
    path = tmp_path / "semi.csv"
    path.write_text(separator.join(["sku", "title", "color"]) + "\nS1" + separator + "Mug" + separator + "red\n", encoding="utf-8")
    with pytest.raises(CatalogError) as err:
        Catalog(path)
    assert "semi.csv has no 'sku' column" in str(err.value)
    assert f"The file looks separated by {named}: save it as comma-separated CSV" in str(err.value)


def test_a_plain_missing_sku_column_gets_no_separator_hint(tmp_path):
    path = write_csv(tmp_path / "nosku.csv", ["title"], [["Mug; red"]])
    with pytest.raises(CatalogError) as err:
        Catalog(path)
    assert "no 'sku' column" in str(err.value) and "separated by" not in str(err.value)


def test_a_csv_with_old_mac_line_endings_is_named_with_the_fix(tmp_path):
    path = tmp_path / "mac.csv"
    path.write_bytes(b"sku,title\rS1,Mug\rS2,Cup\r")
    with pytest.raises(CatalogError) as err:
        Catalog(path)
    assert "mac.csv: malformed CSV header" in str(err.value) and "carriage return alone" in str(err.value)


def test_parquet_column_names_with_spaces_read_under_the_stripped_names(tmp_path):
    path = tmp_path / "spaced.parquet"
    pq.write_table(pa.table({"sku ": ["A1", "A2"], " title": ["Mug", "Cup"], "tags ": [["a"], ["b"]]}), path)
    catalog = Catalog(path)
    assert catalog.columns == ["sku", "title", "tags"] and list(catalog.not_text) == ["tags"]
    rows = list(catalog.rows())
    assert [(r.sku, r.values["title"]) for r in rows] == [("A1", "Mug"), ("A2", "Cup")]


@pytest.mark.parametrize("encoding, named", [("utf-16", "UTF-16"), ("utf-16-le", "UTF-16LE"), ("utf-16-be", "UTF-16BE")])
def test_a_utf16_catalog_is_named_as_excel_unicode_text(tmp_path, encoding, named):
    path = tmp_path / "unicode.csv"
    path.write_bytes("sku\ttitle\nA1\t红色马克杯\n".encode(encoding))
    with pytest.raises(CatalogError) as err:
        Catalog(path)
    message = str(err.value)
    assert "unicode.csv is UTF-16 text (what Excel saves as 'Unicode Text', which is separated by tabs)" in message
    assert f"`iconv -f {named} -t UTF-8 {path} > unicode-utf8.csv`" in message and "\x00" not in message


@pytest.mark.parametrize("text, encoding, guess", [
    ("A1,红色马克杯", "gb18030", "probably GB18030 (GBK): `iconv -f GB18030 -t UTF-8"),
    ("A1,Crème brûlée cup", "cp1252", "probably Western European text from Excel (Windows-1252): `iconv -f CP1252 -t UTF-8"),
])
def test_the_non_utf8_hint_guesses_the_encoding_from_the_bad_line(tmp_path, text, encoding, guess):
    path = tmp_path / "legacy.csv"
    path.write_bytes(f"sku,title\n{text}\n".encode(encoding))
    with pytest.raises(CatalogError) as err:
        list(Catalog(path).rows())
    message = str(err.value)
    assert "legacy.csv: line 2 is not UTF-8 text" in message and guess in message and "a guess" in message
    assert ("GBK" in message) == (encoding == "gb18030")


def test_a_glob_refuses_catalog_files_it_cannot_read_and_reads_a_file_named_twice_once(tmp_path, monkeypatch):
    import gzip

    from zimage_batch.catalog import expand_sources

    folder = tmp_path / "exp"
    folder.mkdir()
    write_csv(folder / "a.csv", ["sku", "title"], [["A1", "red"]])
    (folder / "b.csv.gz").write_bytes(gzip.compress(b"sku,title\nB1,blue\n"))
    (folder / "c.xlsx").write_bytes(b"PK")
    (folder / "d.tsv").write_text("sku\ttitle\nD1\tgreen\n")
    (folder / "notes.txt").write_text("not a catalog")
    monkeypatch.chdir(tmp_path)
    paths, problems = expand_sources(["exp/*"])
    assert paths == ["exp/a.csv"] and len(problems) == 1
    assert problems[0].startswith("Catalog pattern 'exp/*' matches file(s) this reader cannot read: exp/b.csv.gz, exp/c.xlsx, exp/d.tsv.")
    assert "Save As 'CSV UTF-8'" in problems[0] and "gunzip" in problems[0]
    assert expand_sources(["exp/*.csv"]) == (["exp/a.csv"], [])
    assert expand_sources(["exp/a.csv", "./exp/a.csv", str(folder / "a.csv"), "exp/*.csv"]) == (["exp/a.csv"], [])


def test_a_long_csv_value_is_read_and_one_over_the_limit_names_its_row(tmp_path):
    from zimage_batch.catalog import FIELD_LIMIT

    html = "<p>" + "x" * 300_000 + "</p>"
    path = write_csv(tmp_path / "html.csv", ["sku", "description"], [["A1", html]])
    assert [r.values["description"] for r in Catalog(path).rows()] == [html]
    path = write_csv(tmp_path / "huge.csv", ["sku", "description"], [["A1", "ok"], ["A2", "x" * (FIELD_LIMIT + 1)]])
    with pytest.raises(CatalogError) as err:
        list(Catalog(path).rows())
    message = str(err.value)
    assert "huge.csv: data row 2 (from line 3) holds a value longer than 64 MiB" in message
    assert "(67,108,870 characters read for the row so far)" in message and "quotes are balanced" not in message


def test_a_repeated_header_is_a_row_problem_and_a_bom_starting_any_line_is_removed(tmp_path):
    path = tmp_path / "concat.csv"
    path.write_bytes(b"\xef\xbb\xbfsku,title\nA1,red\n\xef\xbb\xbfsku,title\n\xef\xbb\xbfB1,green mug\n")
    items = list(Catalog(path).rows())
    assert [(i.row, i.values) for i in items if isinstance(i, Row)] == [(1, {"sku": "A1", "title": "red"}),
                                                                        (3, {"sku": "B1", "title": "green mug"})]
    (problem,) = [i for i in items if isinstance(i, RowProblem)]
    assert str(problem) == (f"{path}, line 3: the line repeats the header (the column names): were files concatenated? "
                            f"Delete the line, or join exports without their header lines (e.g. `tail -n +2 FILE`).")


def test_a_row_of_blank_cells_is_skipped_like_an_empty_line(tmp_path):
    path = _write_lines(tmp_path / "blank.csv", ["sku,title", "A1,red", ",,", "   ,   ", "", "A2,blue"])
    items = list(Catalog(path).rows())
    assert [(i.row, i.sku) for i in items] == [(1, "A1"), (2, "A2")] and all(isinstance(i, Row) for i in items)


def test_excel_header_quirks_get_accurate_messages(tmp_path):
    blank_first = tmp_path / "blankfirst.csv"
    blank_first.write_text("\nsku,title\nA1,red\n")
    with pytest.raises(CatalogError, match=r"blankfirst.csv: line 1 is blank, but the header \(the column names\) must be "
                                           r"the first line of the file. Delete the blank line\(s\) above the header."):
        Catalog(blank_first)

    sep = _write_lines(tmp_path / "sep.csv", ["sep=,", "sku,title", "A1,red"])
    catalog = Catalog(sep)
    assert catalog.columns == ["sku", "title"] and [r.values for r in catalog.rows()] == [{"sku": "A1", "title": "red"}]
    semicolons = _write_lines(tmp_path / "semi.csv", ["sep=;", "sku;title", "A1;red"])
    with pytest.raises(CatalogError, match="separated by ';'"):
        Catalog(semicolons)

    upper = _write_lines(tmp_path / "upper.csv", [" SKU , Title ", "A1,red"])
    with pytest.raises(CatalogError) as err:
        Catalog(upper)
    assert "upper.csv has no 'sku' column; did you mean 'SKU'? Column names are case-sensitive: rename it to 'sku' (its columns: SKU, Title)" in str(err.value)
    pq.write_table(pa.table({"SKU": ["A1"]}), tmp_path / "upper.parquet")
    with pytest.raises(CatalogError, match="did you mean 'SKU'"):
        Catalog(tmp_path / "upper.parquet")

    invisible = _write_lines(tmp_path / "zw.csv", ["\u200bsku,title", "A1,red"])
    with pytest.raises(CatalogError) as err:
        Catalog(invisible)
    assert "did you mean '\\u200bsku'?" in str(err.value) and "(its columns: '\\u200bsku', title)" in str(err.value)
    double_bom = tmp_path / "bom2.csv"
    double_bom.write_bytes(("\ufeffsku,title\nA1,red\n").encode("utf-8-sig"))
    assert Catalog(double_bom).columns == ["sku", "title"]


def test_a_sku_excel_turned_into_scientific_notation_is_a_row_problem(tmp_path):
    path = write_csv(tmp_path / "c.csv", ["sku", "title"], [["1.23457E+11", "a"], ["123456789012", "b"], ["E+11", "c"]])
    items = list(Catalog(str(path)).rows())
    assert isinstance(items[0], RowProblem) and "scientific notation" in items[0].message and items[0].sku == "1.23457E+11"
    assert [i.sku for i in items[1:]] == ["123456789012", "E+11"] and all(isinstance(i, Row) for i in items[1:])
