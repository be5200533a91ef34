"""User-facing messages: where a row problem is (the file's line and the sku), every problem of a size or a
front matter at once, where a setting came from, text used as a number, and S3 patterns."""

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import TEMPLATES, write_csv, write_template
from zimage_batch.catalog import Catalog, RowProblem
from zimage_batch.errors import CatalogError, PlanError, TemplateError
from zimage_batch.plan import Job, RowProblems, check_inputs, plan_jobs, summarize
from zimage_batch.postprocess import PRESETS
from zimage_batch.templates import load_template, parse_size

WHITE = str(TEMPLATES / "product_white.j2")
HEADER = ["sku", "title", "color", "kind", "material"]


def _plan(catalog, template, **kw):
    return list(plan_jobs(check_inputs([str(catalog)], [str(template)], "tiny-random", PRESETS, **kw)))


# 1. row problems name the line a user finds in an editor or Excel, and the sku


def test_a_row_problem_names_the_files_line_and_the_sku_not_the_data_row(tmp_path):
    cat = write_csv(tmp_path / "rowprob.csv", HEADER, [["BTL-001", "Bottle", "navy", "bottle", "steel"],
                                                       ["MUG-002", "Mug", "", "mug", "clay"],
                                                       ["BTL-001", "Again", "red", "bottle", "steel"]])
    items = _plan(cat, WHITE)
    empty, again = [i for i in items if isinstance(i, RowProblem)]
    assert str(empty).startswith(f"{cat}, line 3 (sku MUG-002): column 'color' is empty")  # line 3 = Excel's row 3
    assert str(again) == f"{cat}, line 4 (sku BTL-001): this sku already appeared in {cat}, line 2; skus must be unique."
    (job,) = [i for i in items if isinstance(i, Job)]
    assert job.row == 1 and (empty.row, again.row) == (2, 3)  # the data row numbers (manifest, job ids) are unchanged


def test_a_row_after_a_value_over_several_lines_is_named_by_the_line_it_starts_on(tmp_path):
    cat = tmp_path / "multi.csv"
    cat.write_text('sku,title,color,kind,material\nA1,"Mug\nwith a\nhandle",red,mug,clay\nA2,Cup,,mug,clay\n'
                   'A3,"Pan\nlid",,pan,iron\nA4,Pot,,pot,clay\n', encoding="utf-8")
    problems = [i for i in _plan(cat, WHITE) if isinstance(i, RowProblem)]
    assert [(p.row, p.line, p.sku) for p in problems] == [(2, 5, "A2"), (3, 6, "A3"), (4, 8, "A4")]
    assert str(problems[0]).startswith(f"{cat}, line 5 (sku A2): ")
    grouped = summarize(plan_jobs(check_inputs([str(cat)], [WHITE], "tiny-random", PRESETS)))
    assert grouped.problems == [f"{cat}, lines 5-8 (3 rows; skus A2, A3, A4): column 'color' is empty in this row, but "
                                f"template {WHITE} uses it. Fill it in, or guard it in the template with "
                                f"{{% if color is defined %}}...{{% endif %}}."]


def test_a_parquet_row_problem_keeps_the_row_number_and_names_the_sku(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"sku": ["P1", "P2"], "title": ["Mug", "Cup"], "color": ["red", None],
                             "kind": ["mug", "cup"], "material": ["clay", "clay"]}), path)
    (problem,) = [i for i in _plan(path, WHITE) if isinstance(i, RowProblem)]
    assert problem.line is None and str(problem).startswith(f"{path}, row 2 (sku P2): column 'color' is empty")


def test_grouped_row_problems_name_lines_with_a_few_skus_and_parquet_rows_stay_rows():
    problems = RowProblems()
    for row in range(1, 301):
        problems.add(RowProblem("c.csv", row, "same", f"S{row}", row + 1))
    problems.add(RowProblem("p.parquet", 4, "other", "P4"))
    problems.add(RowProblem("p.parquet", 5, "other", "P5"))
    problems.add(RowProblem("c.csv", 9, "no sku", "", 10))
    assert problems.listed() == ["c.csv, lines 2-301 (300 rows; skus S1, S2, S3, ...): same",
                                 "p.parquet, rows 4-5 (2 rows; skus P4, P5): other",
                                 "c.csv, line 10: no sku"]


def test_a_sku_with_spaces_is_quoted_so_its_ends_show(tmp_path):
    assert str(RowProblem("c.csv", 1, "bad", " A 1", 2)) == "c.csv, line 2 (sku ' A 1'): bad"


# 2. a size names every problem


@pytest.mark.parametrize("size, phrases", [
    ("100x100000", ["width 100 is outside 256..2048", "height 100000 is outside 256..2048"]),
    ("1000x1000", ["width 1000 is not a multiple of 16 (use 992 or 1008)", "height 1000 is not a multiple of 16"]),
    ("100x1000", ["width 100 is outside", "height 1000 is not a multiple of 16 (use 992 or 1008)"]),
])
def test_a_size_names_every_problem_at_once(size, phrases):
    with pytest.raises(ValueError) as caught:
        parse_size(size)
    assert all(phrase in str(caught.value) for phrase in phrases), str(caught.value)


def test_the_command_line_size_names_both_sides(tmp_path):
    cat = write_csv(tmp_path / "c.csv", HEADER, [["S1", "Mug", "red", "mug", "clay"]])
    with pytest.raises(PlanError) as caught:
        check_inputs([str(cat)], [WHITE], "tiny-random", PRESETS, size="100x100000")
    assert "--size: size 100x100000: width 100 is outside 256..2048, and height 100000 is outside 256..2048." in str(caught.value)


# 3. front matter: a close match for an unknown key, and every problem in one message


def test_an_unknown_front_matter_key_gets_a_close_match_and_a_bad_size_is_named_with_it(tmp_path):
    path = write_template(tmp_path / "t.j2", "{{ title }}", "size: 1000x1000\nvariant: 2")
    with pytest.raises(TemplateError) as caught:
        load_template(path)
    message = str(caught.value)
    assert "variant: unknown key (did you mean 'variants'?)" in message
    assert "size 1000x1000: width 1000 is not a multiple of 16" in message and "Extra inputs" not in message
    assert message.count("\n") == 0  # one paragraph


def test_an_unknown_key_with_no_close_match_still_lists_the_known_keys(tmp_path):
    path = write_template(tmp_path / "t.j2", "{{ title }}", "zzz: 1")
    with pytest.raises(TemplateError, match=re.escape("zzz: unknown key). Known keys: description, size")):
        load_template(path)


# 4. a note names the command line when the value came from it


def test_a_steps_note_names_the_command_line_not_the_template(tmp_path):
    cat = write_csv(tmp_path / "c.csv", HEADER, [["S1", "Mug", "red", "mug", "clay"]])
    notes = check_inputs([str(cat)], [WHITE], "Tongyi-MAI/Z-Image-Turbo", PRESETS, steps=3).notes()
    assert len(notes) == 1 and notes[0].startswith("--steps 3 (given on the command line") and WHITE not in notes[0]
    few = write_template(tmp_path / "few.j2", "{{ title }}", "steps: 4")
    (note,) = check_inputs([str(cat)], [str(few)], "Tongyi-MAI/Z-Image-Turbo", PRESETS).notes()
    assert note.startswith(f"{few}: 4 step(s) (its front matter's steps)")


# 5. catalog values are text: a template that uses one as a number is refused before anything runs


@pytest.mark.parametrize("body, expression, fixed", [
    ("{{ title }} for {{ price * 2 }}", "price * 2", "price | float * 2"),
    ("{{ title }}{% if stock > 0 %} in stock{% endif %}", "stock > 0", "stock | float > 0"),
    ("{{ title }}{% if stock == 0 %} sold out{% endif %}", "stock == 0", "stock | float == 0"),
    ("{{ title }} {{ row['price'] - 1 }}", "row['price'] - 1", "row['price'] | float - 1"),
])
def test_a_csv_value_used_as_a_number_is_refused_with_the_fix(tmp_path, body, expression, fixed):
    cat = write_csv(tmp_path / "c.csv", ["sku", "title", "price", "stock"], [["007", "Mug", "24.90", "0"]])
    template = write_template(tmp_path / "t.j2", body)
    with pytest.raises(PlanError) as caught:
        check_inputs([str(cat)], [str(template)], "tiny-random", PRESETS)
    message = str(caught.value)
    assert f"Template {template}, line 1: `{expression}` uses column" in message and f"of catalog {cat}" in message
    assert "CSV values are text" in message and f"`{fixed}`" in message


def test_converted_values_text_operations_and_parquet_numbers_pass(tmp_path):
    cat = write_csv(tmp_path / "c.csv", ["sku", "title", "price"], [["007", "Mug", "24.90"]])
    fine = write_template(tmp_path / "fine.j2", "{{ title + ' mug' }} {{ price | float * 2 }} {{ '%s' % price }}"
                                                "{% if title == 'Mug' %} cup{% endif %} {{ variant * 2 }}")
    (job,) = _plan(cat, fine)
    assert job.prompt == "Mug mug 49.8 24.90 cup 0" and job.sku == "007"  # a sku keeps its leading zeros
    numbers = tmp_path / "n.parquet"
    pq.write_table(pa.table({"sku": ["007"], "title": ["Mug"], "price": [24.9]}), numbers)
    doubled = write_template(tmp_path / "doubled.j2", "{{ title }} {{ price * 2 }}")
    (job,) = _plan(numbers, doubled)
    assert job.prompt == "Mug 49.8"
    assert Catalog(numbers).text_columns == {"sku", "title"}


@pytest.mark.parametrize("body, prompt", [
    ("{% set price = price | float %}{{ title }} for {{ '%.2f' | format(price * 1.1) }}", "Mug for 27.39"),
    ("{% macro twice(price) %}{{ price * 2 }}{% endmacro %}{{ title }} {{ twice(price | float) }}", "Mug 49.8"),
    ("{% for price in [1, 2] %}{{ price * 2 }}{% endfor %} {{ title }} {{ price }}", "24 Mug 24.90"),
    ("{% with price = price | float %}{{ title }} {{ price * 2 }}{% endwith %}", "Mug 49.8"),
])
def test_a_name_the_template_binds_itself_is_not_taken_for_the_raw_column(tmp_path, body, prompt):
    cat = write_csv(tmp_path / "c.csv", ["sku", "title", "price"], [["007", "Mug", "24.90"]])
    (job,) = _plan(cat, write_template(tmp_path / "t.j2", body))
    assert job.prompt == prompt


# 6. S3 catalogs: patterns are not expanded there


def test_an_s3_pattern_says_patterns_are_local_only_and_names_the_objects_it_would_match(s3):
    for key in ("catalogs/spring.csv", "catalogs/summer.parquet", "catalogs/notes.txt", "other/autumn.csv"):
        s3.client.put_object(Bucket=s3.bucket, Key=key, Body=b"sku,title\nS1,Mug\n")
    with pytest.raises(CatalogError) as caught:
        Catalog(f"s3://{s3.bucket}/catalogs/*")
    message = str(caught.value)
    assert "patterns (*, ?, [...]) are expanded only for local paths" in message and "aws s3 ls" not in message
    assert f"it would match s3://{s3.bucket}/catalogs/spring.csv s3://{s3.bucket}/catalogs/summer.parquet: pass them" in message
    with pytest.raises(CatalogError) as caught:
        Catalog(f"s3://{s3.bucket}/nothing-here/*.csv")
    message = str(caught.value)
    assert "expanded only for local paths" in message and f"`aws s3 ls s3://{s3.bucket}/nothing-here/`" in message
    assert "*.csv`" not in message  # not the old `aws s3 ls s3://.../*.csv`, which does not work either
