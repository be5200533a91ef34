import pytest

from conftest import CATALOGS, TEMPLATES, write_csv, write_template
from zimage_batch.catalog import RowProblem
from zimage_batch.errors import PlanError
from zimage_batch.plan import Job, check_inputs, derive_seed, plan_jobs, strict_check, summarize
from zimage_batch.postprocess import PRESETS

ALL_TEMPLATES = [str(TEMPLATES / n) for n in ("product_white.j2", "lifestyle_scene.j2", "poster_text.j2")]


def plan(catalogs, templates, model="tiny-random", **kw):
    inputs = check_inputs([str(c) for c in catalogs], [str(t) for t in templates], model, PRESETS, **kw)
    return list(plan_jobs(inputs))


def test_rows_times_templates_times_variants():
    jobs = plan([CATALOGS / "demo.csv"], ALL_TEMPLATES)
    assert all(isinstance(j, Job) for j in jobs)
    assert len(jobs) == 14 * (1 + 2 + 1)
    assert len({j.job_id for j in jobs}) == len(jobs)
    first = jobs[0]
    assert (first.sku, first.template, first.variant, first.row) == ("BTL-001", "product_white", 0, 1)
    assert first.presets == ("amazon_main", "web") and first.background == "white"


def test_csv_and_parquet_plan_the_same_jobs():
    a = plan([CATALOGS / "demo.csv"], ALL_TEMPLATES)
    b = plan([CATALOGS / "demo.parquet"], ALL_TEMPLATES)
    assert [(j.job_id, j.seed, j.prompt) for j in a] == [(j.job_id, j.seed, j.prompt) for j in b]


def test_plan_is_deterministic_and_seeds_are_derived_from_sku_template_variant():
    a = plan([CATALOGS / "demo.csv"], ALL_TEMPLATES)
    b = plan([CATALOGS / "demo.csv"], ALL_TEMPLATES)
    assert a == b
    assert a[0].seed == derive_seed("BTL-001", "product_white", 0)
    assert len({j.seed for j in a}) == len(a)


def test_job_id_tracks_what_determines_the_image(tmp_path, scene_template):
    header = ["sku", "title", "color", "kind", "price"]
    base = write_csv(tmp_path / "a.csv", header, [["S1", "Mug", "red", "mug", "10"]])
    price = write_csv(tmp_path / "b.csv", header, [["S1", "Mug", "red", "mug", "99"]])
    title = write_csv(tmp_path / "c.csv", header, [["S1", "Big mug", "red", "mug", "10"]])
    ids = [plan([c], [scene_template])[0].job_id for c in (base, price, title)]
    assert ids[0] == ids[1]  # price is not used by the template
    assert ids[0] != ids[2]  # title is
    assert plan([base], [scene_template], model="tiny-random")[0].job_id != plan([base], [scene_template], model="org/other")[0].job_id
    assert plan([base], [scene_template], size="512x512")[0].job_id != ids[0]



def test_job_ids_name_the_image_so_equal_prompts_never_share_one(tmp_path):
    """Two rows (or templates) that render the same prompt with the same seed are two images, each
    with its own record; a template whose presets or background change is new work."""
    cat = write_csv(tmp_path / "c.csv", ["sku", "kind", "seed"], [["A-1", "mug", "42"], ["B-2", "mug", "42"]])
    web = write_template(tmp_path / "web.j2", "A {{ kind }} on a kitchen table", "size: 256x256\npresets: [web]")
    png = write_template(tmp_path / "png.j2", "A {{ kind }} on a kitchen table", "size: 256x256\npresets: [png]")
    jobs = plan([cat], [web, png])
    assert len({(j.prompt, j.seed) for j in jobs}) == 1 and len({j.job_id for j in jobs}) == 4
    white = write_template(tmp_path / "web.j2", "A {{ kind }} on a kitchen table", "size: 256x256\npresets: [web]\nbackground: white")
    assert plan([cat], [white])[0].job_id != jobs[0].job_id
    more = write_template(tmp_path / "web.j2", "A {{ kind }} on a kitchen table", "size: 256x256\npresets: [web, png]")
    assert plan([cat], [more])[0].job_id != jobs[0].job_id

def test_seed_column_overrides_derived_seed(tmp_path, scene_template):
    cat = write_csv(tmp_path / "s.csv", ["sku", "title", "color", "kind", "seed"],
                    [["S1", "Mug", "red", "mug", "42"], ["S2", "Cup", "red", "mug", ""], ["S3", "Cup", "red", "mug", "x"]])
    items = plan([cat], [scene_template])
    assert items[0].seed == 42
    assert items[1].seed == derive_seed("S2", "scene", 0)
    assert isinstance(items[2], RowProblem) and "'seed'" in items[2].message


def test_every_input_problem_is_listed_in_one_error(tmp_path):
    cat = write_csv(tmp_path / "cat.csv", ["sku", "title"], [["S1", "Mug"]])
    t1 = write_template(tmp_path / "t1.j2", "{{ title }} {{ colr }} {{ brand }}", "size: 1000x1000")
    t2 = write_template(tmp_path / "t2.j2", "{{ title }}", "presets: [amazon-main]")
    with pytest.raises(PlanError) as err:
        plan([cat, tmp_path / "missing.csv"], [t1, t2, tmp_path / "gone.j2"])
    problems = err.value.problems
    text = str(err.value)
    assert len(problems) == 6, text
    assert "missing.csv does not exist" in text and "gone.j2 does not exist" in text
    assert "t1.j2 uses {{ brand }}" in text and "t1.j2 uses {{ colr }}" in text and "cat.csv" in text
    assert "not a multiple of 16" in text
    assert "unknown preset 'amazon-main' (did you mean 'amazon_main'?)" in text


def test_row_problems_do_not_stop_other_rows(tmp_path, scene_template):
    cat = write_csv(tmp_path / "r.csv", ["sku", "title", "color", "kind"],
                    [["S1", "Mug", "red", "mug"], ["S2", "Cup", "", "mug"], ["S1", "Again", "red", "mug"], ["S4", "Pan", "red", "pan"]])
    items = plan([cat], [scene_template])
    problems = [i for i in items if isinstance(i, RowProblem)]
    assert [j.sku for j in items if isinstance(j, Job)] == ["S1", "S4"]
    assert problems[0].row == 2 and "'color' is empty" in problems[0].message and "scene.j2" in problems[0].message
    assert problems[1].row == 3 and "already appeared" in problems[1].message
    inputs = check_inputs([str(cat)], [str(scene_template)], "tiny-random", PRESETS)
    with pytest.raises(PlanError, match="--strict: 2 row"):
        strict_check(inputs)
    summary = summarize(plan_jobs(inputs))
    assert (summary.jobs, summary.rows, len(summary.problems)) == (2, 2, 2)


def test_the_same_problem_on_many_rows_is_listed_once_with_its_rows(tmp_path, capsys):
    from zimage_batch.cli import main
    from zimage_batch.plan import RowProblems

    rows = [[f"S{i}", "red" if i % 100 == 50 else ""] for i in range(300)]  # data rows 51, 151, 251 (lines 52, ...) have a color
    cat = write_csv(tmp_path / "cat.csv", ["sku", "color"], rows)
    broken = write_template(tmp_path / "broken.j2", "A mug, {{ 1 / 0 }}")
    summary = summarize(plan_jobs(check_inputs([str(cat)], [str(broken)], "tiny-random", PRESETS)))
    assert summary.problem_count == 300 and summary.problems == [
        f"{cat}, lines 2-301 (300 rows; skus S0, S1, S2, ...): template {broken} failed to render: ZeroDivisionError: "
        f"division by zero."]

    colored = write_template(tmp_path / "colored.j2", "A {{ color }} mug")
    assert main(["plan", str(cat), "-t", str(colored)]) == 0
    err = capsys.readouterr().err
    assert "297 row problem(s)" in err
    assert f"{cat}, lines 2-51, 53-151, 153-251, 253-301 (297 rows; skus S0, S1, S2, ...): column 'color'" in err
    assert err.count("column 'color' is empty") == 1

    problems = RowProblems()
    for row in [*range(1, 40, 2), 41]:
        problems.add(RowProblem("c.csv", row, "same"))
    problems.add(RowProblem("c.csv", 7, "other"))
    assert problems.listed() == ["c.csv, rows 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, ... (21 rows): same",
                                 "c.csv, row 7: other"]
    assert problems.count == 22


def test_bad_overrides_and_bad_model_folder(tmp_path, small_catalog, scene_template):
    with pytest.raises(PlanError) as err:
        plan([small_catalog], [scene_template], model=str(tmp_path / "no-model"), size="100x100", steps=0)
    text = str(err.value)
    assert "--size" in text and "--steps 0" in text and "no-model does not exist" in text


def test_the_articles_prompts_run_as_written_through_the_free_form_template():
    import csv

    with open(CATALOGS / "article_prompts.csv", encoding="utf-8", newline="") as f:
        written = [row["prompt"] for row in csv.DictReader(f)]
    jobs = plan([CATALOGS / "article_prompts.csv"], [TEMPLATES / "prompt.j2"])
    assert all(isinstance(j, Job) for j in jobs) and len(jobs) == 14
    assert [j.prompt for j in jobs] == written  # Chinese text and its quotes intact: "茗香", "Morning Coffee"
    assert '"茗香"' in jobs[0].prompt and '"Morning Coffee"' in jobs[13].prompt


def test_a_missing_attribute_is_named_as_such_not_as_a_column_called_dict_object(tmp_path):
    cat = write_csv(tmp_path / "c.csv", ["sku", "title"], [["S1", "Mug"]])
    template = write_template(tmp_path / "t.j2", "{{ row.nosuch }} {{ title }}")
    (problem,) = plan([cat], [template])
    assert isinstance(problem, RowProblem) and "asks for .nosuch" in problem.message and "dict object' is empty" not in problem.message


def test_turbo_settings_it_was_not_made_for_get_a_note(tmp_path):
    cat = write_csv(tmp_path / "c.csv", ["sku", "title"], [["S1", "Mug"]])
    odd = write_template(tmp_path / "odd.j2", "{{ title }}", "steps: 2\nguidance_scale: 7.5")
    usual = write_template(tmp_path / "usual.j2", "{{ title }}")
    turbo = check_inputs([str(cat)], [str(odd), str(usual)], "Tongyi-MAI/Z-Image-Turbo", PRESETS)
    notes = turbo.notes()
    assert len(notes) == 2 and "2 step(s)" in notes[0] and "guidance_scale 7.5" in notes[1]
    assert all("odd.j2" in note for note in notes)
    assert check_inputs([str(cat)], [str(odd)], "Tongyi-MAI/Z-Image-Turbo", PRESETS, steps=8).notes() == notes[1:]
    assert check_inputs([str(cat)], [str(odd)], "tiny-random", PRESETS).notes() == []  # other models have other needs


def test_a_control_character_in_a_row_is_a_row_problem_not_a_silent_change(tmp_path):
    cat = write_csv(tmp_path / "c.csv", ["sku", "title"], [["S1", "Mug\x07"], ["S2", "Cup"]])
    template = write_template(tmp_path / "t.j2", "A {{ title }}")
    problem, ok = plan([cat], [template])
    assert isinstance(problem, RowProblem) and problem.row == 1 and "control character U+0007" in problem.message
    assert isinstance(ok, Job) and ok.prompt == "A Cup"


def test_catalog_columns_the_templates_own_names_would_hide_are_refused(tmp_path):
    cat = write_csv(tmp_path / "shadow.csv", ["sku", "title", "variant", "row", "angle"], [["A1", "Tee", "Large / Red", "7", "top"]])
    template = write_template(tmp_path / "shadow.j2", "{{ title }} in {{ variant }} (row {{ row }}) angle {{ angle }}",
                              "variants: [{angle: front}, {angle: side}]")
    with pytest.raises(PlanError) as err:
        plan([cat], [template])
    problems = err.value.problems
    assert problems == [
        f"Catalog {cat} has a column 'angle', but in template {template} {{{{ angle }}}} means the value its 'variants:' "
        f"list sets for each variant, not this column. Rename the key in the template's 'variants:' (e.g. to "
        f"'shot_angle'), or rename the column, so each name means one thing.",
        f"Catalog {cat} has a column 'row', but in template {template} {{{{ row }}}} means the row's values (all "
        f"columns), not this column. Rename the column (e.g. to 'row_label') and use that name in the template.",
        f"Catalog {cat} has a column 'variant', but in template {template} {{{{ variant }}}} means the variant number "
        f"(0, 1, ...), not this column. Rename the column (e.g. to 'size_variant') and use that name in the template.",
    ]
    row_used = write_template(tmp_path / "row_used.j2", "{{ title }} in {{ row['variant'] }}")  # uses `row`: the 'row' column is hidden
    with pytest.raises(PlanError, match="column 'row'"):
        plan([cat], [row_used])
    plain = write_template(tmp_path / "plain.j2", "{{ title }}, size {{ size_variant }}")
    renamed = write_csv(tmp_path / "renamed.csv", ["sku", "title", "size_variant", "angle"], [["A1", "Tee", "Large / Red", "top"]])
    [job] = plan([renamed], [plain])
    assert job.prompt == "Tee, size Large / Red"
    [job] = plan([cat], [write_template(tmp_path / "t.j2", "{{ title }}")])  # the columns are only refused where used
    assert job.prompt == "Tee"


def test_a_csv_seed_written_as_a_whole_float_reads_like_the_parquet_int(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_cat = write_csv(tmp_path / "gap.csv", ["sku", "title", "seed"], [["S1", "Mug", "11.0"], ["S2", "Cup", "12.5"]])
    pq.write_table(pa.table({"sku": ["S1"], "title": ["Mug"], "seed": [11.0]}), tmp_path / "gap.parquet")
    template = write_template(tmp_path / "t.j2", "{{ title }}")
    items = plan([csv_cat], [template])
    assert [(j.sku, j.seed) for j in items if isinstance(j, Job)] == [("S1", 11)]
    assert [p.row for p in items if isinstance(p, RowProblem)] == [2]
    [job] = plan([tmp_path / "gap.parquet"], [template])
    assert (job.seed, job.prompt) == (11, "Mug")


def test_plan_exits_2_when_no_job_was_planned(tmp_path, capsys):
    from zimage_batch.cli import main

    broken = write_template(tmp_path / "broken.j2", "A mug, {{ 1 / 0 }}")
    cat = write_csv(tmp_path / "cat.csv", ["sku", "title"], [["S1", "Mug"], ["S2", "Cup"]])
    assert main(["plan", str(cat), "-t", str(broken)]) == 2
    out, err = capsys.readouterr()
    assert "0 jobs from 0 rows" in out and "2 row problem(s)" in err
    assert err.endswith("No job was planned: all 2 row(s) have problems (listed above). Fix the catalog or the templates and run again.\n")
    empty = write_csv(tmp_path / "empty.csv", ["sku", "title"], [])
    assert main(["plan", str(empty), "-t", str(broken)]) == 2
    assert "No job was planned: the catalogs have no rows." in capsys.readouterr().err
    assert main(["plan", str(cat), "-t", str(write_template(tmp_path / "ok.j2", "{{ title }}"))]) == 0


def test_a_column_the_template_guards_may_be_missing_from_the_catalog(tmp_path):
    """The row-level advice says to guard a column with `is defined`; a catalog without it must then plan."""
    cat = write_csv(tmp_path / "cat.csv", ["sku", "title"], [["A1", "mug"], ["A2", "cup"]])
    guarded = write_template(tmp_path / "guarded.j2", "A {{ title }}{% if color is defined %}, {{ color }}{% endif %}, "
                             "made of {{ material | default('steel') }}")
    jobs = plan([cat], [guarded])
    assert [j.prompt for j in jobs] == ["A mug, made of steel", "A cup, made of steel"]
    colored = write_csv(tmp_path / "colored.csv", ["sku", "title", "color"], [["B1", "lamp", "red"]])
    assert [j.prompt for j in plan([colored], [guarded])] == ["A lamp, red, made of steel"]
    unguarded = write_template(tmp_path / "plain.j2", "A {{ title }}, {{ color }}")
    with pytest.raises(PlanError, match="has no column 'color'"):
        plan([cat], [unguarded])
