import re

import pytest

from conftest import TEMPLATES, write_template
from zimage_batch.errors import TemplateError
from zimage_batch.templates import collapse_whitespace, load_template, parse_size


def test_shipped_templates_load_with_their_settings():
    white = load_template(TEMPLATES / "product_white.j2")
    assert white.name == "product_white"
    assert white.settings.background == "white" and "amazon_main" in white.settings.presets
    assert white.settings.dimensions() == (1024, 1024) and white.settings.steps == 8
    assert white.settings.guidance_scale == 0.0
    scene = load_template(TEMPLATES / "lifestyle_scene.j2")
    assert len(scene.settings.variant_contexts()) == 2 and "angle" not in scene.required_columns()
    poster = load_template(TEMPLATES / "poster_text.j2")
    assert {"brand", "title_zh"} <= poster.required_columns()
    prompt, _ = poster.render({"brand": "茗香", "title_zh": "龙井"}, 0)
    assert "“茗香”" in prompt and " " not in prompt  # CJK lines join without spaces


def test_no_front_matter_uses_defaults(tmp_path):
    t = load_template(write_template(tmp_path / "plain.j2", "a {{ title }}"))
    assert t.settings.size == "1024x1024" and t.settings.presets == ["web"]
    assert t.render({"title": "mug"}, 0) == ("a mug", "")


def test_catalog_values_are_data_not_template_code(tmp_path):
    t = load_template(write_template(tmp_path / "t.j2", "{{ title }}"))
    assert t.render({"title": "{{ 7*7 }} {% if 1 %}x{% endif %}"}, 0)[0] == "{{ 7*7 }} {% if 1 %}x{% endif %}"


def test_sandbox_blocks_unsafe_attribute_access(tmp_path):
    from jinja2.exceptions import SecurityError

    t = load_template(write_template(tmp_path / "t.j2", "{{ title.__class__.__mro__[1].__subclasses__() }}"))
    with pytest.raises(SecurityError):
        t.render({"title": "x"}, 0)


def test_undefined_variable_is_strict(tmp_path):
    import jinja2

    t = load_template(write_template(tmp_path / "t.j2", "{{ title }} {{ colour }}"))
    assert t.required_columns() == {"title", "colour"}
    with pytest.raises(jinja2.UndefinedError):
        t.render({"title": "x"}, 0)


def test_variants_as_mappings_and_row_access(tmp_path):
    t = load_template(write_template(tmp_path / "t.j2", "{{ row['product name'] }} {{ angle }} #{{ variant }}",
                                     "variants:\n  - angle: front\n  - angle: side"))
    assert t.required_columns() == set()
    assert [t.render({"product name": "Mug"}, v)[0] for v in (0, 1)] == ["Mug front #0", "Mug side #1"]


def test_whitespace_collapses_but_not_between_cjk():
    assert collapse_whitespace("a\n   b\tc") == "a b c"
    assert collapse_whitespace("国风茶馆，\n  红灯笼 and lanterns") == "国风茶馆，红灯笼 and lanterns"


@pytest.mark.parametrize(
    "front, body, expected",
    [
        ("size: [1, 2", "x", "bad front matter"),
        ("- a\n- b", "x", "must be a YAML mapping"),
        ("colour: red", "x", "colour"),
        ("steps: 0", "x", "steps"),
        ("presets: []", "x", "presets"),
        ("background: black", "x", "background"),
        ("size: 512x512", "   \n", "no prompt body"),
        ("size: 512x512", "line one\n{{ title }\n", "line 5: Jinja syntax error"),
        ("size: 512x512", "{% if x %}open", "Jinja syntax error"),
    ],
)
def test_bad_templates_name_the_file_and_the_problem(tmp_path, front, body, expected):
    path = write_template(tmp_path / "bad.j2", body, front)
    with pytest.raises(TemplateError) as err:
        load_template(path)
    assert expected in str(err.value) and "bad.j2" in str(err.value)


def test_unclosed_front_matter_and_missing_file(tmp_path):
    (tmp_path / "open.j2").write_text("---\nsize: 512x512\nbody", encoding="utf-8")
    with pytest.raises(TemplateError, match="never closed"):
        load_template(tmp_path / "open.j2")
    with pytest.raises(TemplateError, match="does not exist"):
        load_template(tmp_path / "nope.j2")


@pytest.mark.parametrize("size, ok", [("1024x1024", (1024, 1024)), ("896×1152", (896, 1152)), ("1000x1024", None),
                                      ("1024", None), ("128x128", None), ("axb", None)])
def test_parse_size(size, ok):
    if ok:
        assert parse_size(size) == ok
    else:
        with pytest.raises(ValueError):
            parse_size(size)


def test_size_error_suggests_multiples_of_16():
    with pytest.raises(ValueError, match="use 992 or 1008"):
        parse_size("1000x1024")


def test_size_errors_suggest_only_sizes_that_are_accepted():
    with pytest.raises(ValueError, match="one number: give both sides, WIDTHxHEIGHT, e.g. 384x384"):
        parse_size("384")  # "降到384" in the FAQ means 384x384
    with pytest.raises(ValueError, match="width 100 is outside 256..2048"):
        parse_size("100x100")  # not "use 96 or 112", which would fail next
    with pytest.raises(ValueError, match="use 2032 or 2048"):
        parse_size("2040x1024")


@pytest.mark.parametrize("front, phrase", [
    ("size: 1024", "YAML read it as the number 1024; write both sides, e.g. size: 1024x1024"),
    ("size: 0x0", "YAML read it as the number 0"),
    ("steps: true", "steps: Input should be a valid integer"),
])
def test_front_matter_that_yaml_reads_as_another_type_is_named(tmp_path, front, phrase):
    path = write_template(tmp_path / "t.j2", "{{ title }}", front)
    with pytest.raises(TemplateError, match=re.escape(phrase)):
        load_template(path)


def test_a_jinja_error_message_ends_in_one_full_stop(tmp_path):
    path = write_template(tmp_path / "t.j2", "{{ title | nosuchfilter }}")
    with pytest.raises(TemplateError) as caught:
        load_template(path)
    assert "No filter named 'nosuchfilter'. Check" in str(caught.value) and ".." not in str(caught.value)


@pytest.mark.parametrize("tag, text", [
    ("include", '{% include "part.j2" %}'),
    ("import", '{% import "macros.j2" as m %}{{ m.x() }}'),
    ("from", '{% from "macros.j2" import x %}{{ x() }}'),
    ("extends", '{% extends "base.j2" %}'),
])
def test_templates_that_read_other_files_are_refused_when_loaded(tmp_path, tag, text):
    (tmp_path / "part.j2").write_text("PART {{ title }}", encoding="utf-8")
    path = write_template(tmp_path / "t.j2", "{{ title }}\n" + text, "size: 512x512")
    with pytest.raises(TemplateError) as err:
        load_template(path)
    assert str(err.value) == (
        f"Template {path}, line 5: {{% {tag} %}} is not supported: a template is one file, and no other file is read. "
        f"Paste the shared text into this template, or define it as a macro in this file "
        f"({{% macro name() %}}...{{% endmacro %}})."
    )


def test_an_include_in_the_negative_prompt_is_refused_too(tmp_path):
    path = write_template(tmp_path / "t.j2", "{{ title }}", "size: 512x512\nnegative_prompt: '{% include \"n.j2\" %}'")
    with pytest.raises(TemplateError, match=r"t.j2, line 3 \(negative_prompt\): \{% include %\} is not supported"):
        load_template(path)


def test_front_matter_errors_name_the_line_of_the_file(tmp_path):
    negative = write_template(tmp_path / "neg.j2", "line 5 {{ title }}\nline 6\n",
                              'size: 256x256\nguidance_scale: 2\nnegative_prompt: "blurry {{ bad "')
    with pytest.raises(TemplateError, match=r"neg.j2, line 4 \(negative_prompt\): Jinja syntax error"):
        load_template(negative)
    bad_yaml = write_template(tmp_path / "yaml.j2", "{{ title }}\n", "size: 256x256\nsteps: [8")
    with pytest.raises(TemplateError) as err:
        load_template(bad_yaml)
    assert str(err.value) == (f"Template {bad_yaml}, line 3: bad front matter: while parsing a flow sequence, expected "
                              f"',' or ']', but got '<stream end>'. It must be a YAML mapping between two '---' lines.")
