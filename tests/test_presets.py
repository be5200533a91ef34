"""Presets as data: the shipped file, users' TOML/YAML files, and the errors a bad file gives."""

from __future__ import annotations

import pytest

from conftest import ROOT
from zimage_batch.errors import PresetError
from zimage_batch.presets import (
    PRESETS,
    Preset,
    UnknownPresetError,
    format_bytes,
    get_preset,
    load_presets,
    presets_table,
    select_presets,
    unsupported,
)

MB = 1_000_000


@pytest.mark.parametrize(
    ("name", "size", "white", "fill", "fmt", "max_bytes"),
    [
        ("amazon_main", (2000, 2000), True, (0.85, 0.80, 0.90), "JPEG", 10 * MB),
        ("shopify", (2048, 2048), True, (0.85, None, None), "JPEG", 20 * MB),
        ("google_mc", (1500, 1500), True, (0.85, 0.75, 0.90), "JPEG", 16 * MB),
        ("ebay", (1600, 1600), True, (0.85, None, None), "JPEG", 12 * MB),
        ("taobao_main", (800, 800), True, (0.75, 0.60, 0.80), "JPEG", 3 * MB),
        ("jd_main", (800, 800), True, (0.85, None, None), "JPEG", 1 * MB),
    ],
)
def test_marketplace_presets_follow_the_rules_table(name, size, white, fill, fmt, max_bytes) -> None:
    preset = PRESETS[name]
    assert (preset.width, preset.height, preset.fit) == (*size, "pad")
    assert preset.white is white and preset.shadow == "remove"
    assert (preset.fill, preset.fill_min, preset.fill_max) == fill
    assert (preset.format, preset.extension, preset.max_bytes, preset.quality) == (fmt, "jpg", max_bytes, 90)


@pytest.mark.parametrize(
    ("name", "size"),
    [("square_1080", (1080, 1080)), ("portrait_1080x1350", (1080, 1350)), ("story_1080x1920", (1080, 1920)),
     ("banner_1200x628", (1200, 628))],
)
def test_campaign_presets_crop_around_the_subject_and_keep_the_picture(name: str, size: tuple[int, int]) -> None:
    preset = PRESETS[name]
    assert (preset.width, preset.height) == size and preset.fit == "cover" and preset.background == "keep"


def test_the_web_and_archive_presets_templates_use_are_kept() -> None:
    assert (PRESETS["web"].long_side, PRESETS["web"].format, PRESETS["web"].quality) == (1024, "JPEG", 88)
    assert (PRESETS["web_webp"].long_side, PRESETS["web_webp"].format) == (1024, "WEBP")
    assert (PRESETS["web_avif"].format, PRESETS["web_avif"].extension) == ("AVIF", "avif")
    assert (PRESETS["png"].long_side, PRESETS["png"].format) == (None, "PNG")
    assert all(name == preset.name and preset.description for name, preset in PRESETS.items())


def test_a_users_toml_file_adds_extends_and_replaces_presets(tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(
        '[amazon_tight]\nextends = "amazon_main"\nfill = 0.9\nfill_min = 0.88\nfill_max = 0.92\n\n'
        '[catalog_webp]\nfit = "pad"\nwidth = 1200\nheight = 900\nbackground = "white"\nshadow = "keep"\nfill = 0.8\n'
        'format = "WEBP"\nquality = 82\nmax_bytes = "500 KB"\n\n'
        '[web]\nfit = "long_side"\nlong_side = 800\nformat = "JPEG"\nquality = 80\n',
        encoding="utf-8",
    )
    presets = load_presets(path)
    tight = presets["amazon_tight"]
    assert (tight.width, tight.format, tight.white, tight.max_bytes) == (2000, "JPEG", True, 10 * MB)  # inherited
    assert (tight.fill, tight.fill_bounds()) == (0.9, (0.88, 0.92))
    assert "amazon_main" in tight.description
    webp = presets["catalog_webp"]
    assert (webp.extension, webp.max_bytes, webp.shadow, webp.height) == ("webp", 500_000, "keep", 900)
    assert presets["web"].long_side == 800 and PRESETS["web"].long_side == 1024  # replaced for this load only
    assert set(PRESETS) < set(presets)


def test_extending_with_another_fit_drops_the_sizing_that_fit_does_not_use(tmp_path) -> None:
    """amazon_main pads to 2000x2000 at fill 0.85: a long_side child cannot "remove" inherited width and height."""
    path = tmp_path / "mine.toml"
    path.write_text('[amazon_long]\nextends = "amazon_main"\nfit = "long_side"\nlong_side = 1600\n\n'
                    '[web_square]\nextends = "web"\nfit = "cover"\nwidth = 800\nheight = 800\n', encoding="utf-8")
    presets = load_presets(path)
    long = presets["amazon_long"]
    assert (long.fit, long.long_side, long.width, long.height, long.fill) == ("long_side", 1600, None, None, None)
    assert long.white and long.fill_bounds() == (0.80, 0.90)  # what long_side uses is still inherited
    square = presets["web_square"]
    assert (square.fit, square.width, square.height, square.long_side) == ("cover", 800, 800, None)


def test_every_problem_of_a_preset_is_named_at_once(tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('[a]\nfit = "pad"\nwidth = 800\nheight = 800\nfill = 2\nquality = 0\nformat = "JPEG"\n', encoding="utf-8")
    with pytest.raises(PresetError) as caught:
        load_presets(path)
    assert "fill <= 1" in str(caught.value) and "quality must be in 1..100" in str(caught.value)


def test_a_yaml_file_works_the_same(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("lazada:\n  extends: jd_main\n  max_bytes: 3 MB\n  format: PNG\n", encoding="utf-8")
    lazada = load_presets(path)["lazada"]
    assert (lazada.width, lazada.format, lazada.extension, lazada.max_bytes) == (800, "PNG", "png", 3 * MB)


@pytest.mark.parametrize(
    ("name", "text", "phrases"),
    [
        ("missing.toml", None, ["missing.toml does not exist"]),
        ("presets.json", "{}", ["must end in .toml, .yaml or .yml"]),
        ("syntax.toml", "[a]\nfit = pad\n", ["is not valid TOML", "line 2"]),
        ("syntax.yaml", "a: [1, 2\n", ["is not valid YAML", "line"]),
        ("empty.toml", "", ["must hold one table per preset"]),
        ("flat.toml", 'fit = "pad"\n', ["preset 'fit' must be a table of fields"]),
        ("typo.toml", '[a]\nfit = "pad"\nwidth = 800\nheight = 800\nfil = 0.8\nformat = "JPEG"\n',
         ["preset 'a'", "fil: unknown field (did you mean 'fill'?)", "known fields: description, fit"]),
        ("bounds.toml", '[a]\nextends = "jd_main"\nfill = 0.9\nfill_max = 0.8\n', ["fill 0.9 is outside fill_min..fill_max"]),
        ("size.toml", '[a]\nextends = "jd_main"\nmax_bytes = "3 MiB"\n', ["'3 MiB' is not a size"]),
        ("base.toml", '[a]\nextends = "amazon"\n', ["extends unknown preset 'amazon'"]),
        ("named.toml", '[a]\nname = "b"\n', ["remove the 'name' field"]),
        ("folder.toml", '["rejected"]\nextends = "jd_main"\n', ["'rejected' is taken by postprocess's own OUT/rejected",
                                                                 "rename the preset"]),
        ("report.toml", '["postprocess.jsonl"]\nextends = "web"\n', ["preset 'postprocess.jsonl'",
                                                                    "postprocess's own OUT/postprocess.jsonl"]),
        ("case.toml", '["Rejected"]\nextends = "web"\n', ["'Rejected' is taken by postprocess's own OUT/rejected"]),
        ("extends_list.toml", '[a]\nextends = ["web"]\n', ["preset 'a': extends names one preset, e.g. extends = \"web\"; "
                                                          "got ['web']"]),
        ("extends_table.toml", '[a]\nextends = { name = "web" }\n', ["preset 'a': extends names one preset"]),
        ("extends_yaml.yaml", 'a:\n  extends: [web, png]\n', ["preset 'a': extends names one preset"]),
        ("bool_width.toml", '[a]\nfit = "pad"\nwidth = true\nheight = true\nfill = 1\nformat = "JPEG"\n',
         ["width: must be a whole number such as 1000, got true", "height: must be a whole number"]),
        ("float_width.toml", '[a]\nextends = "amazon_main"\nwidth = 1000.5\n', ["width: must be a whole number such as 1000, got 1000.5"]),
        ("text_quality.yaml", 'a:\n  extends: web\n  quality: "90"\n', ["quality: must be a whole number such as 1000, got '90'"]),
        ("bool_bytes.toml", '[a]\nextends = "web"\nmax_bytes = true\n', ["max_bytes: must be a whole byte count or a size such as '1 MB'"]),
        ("float_bytes.toml", '[a]\nextends = "web"\nmax_bytes = 1500000.5\n', ["max_bytes: must be a whole byte count", "got 1500000.5"]),
        ("bool_fill.toml", '[a]\nextends = "jd_main"\nfill = true\n', ["fill: must be a finite number such as 0.85, got true"]),
        ("inf_upscale.toml", '[a]\nextends = "web"\nmax_upscale = inf\n', ["max_upscale: must be a finite number", "got inf"]),
        ("format.toml", '[a]\nextends = "web"\nformat = "GIF"\n', ["format: Input should be 'JPEG', 'WEBP', 'AVIF' or 'PNG'"]),
        ("two.toml", '[a]\nextends = "amazon"\n[b]\nextends = "web"\nquality = 0\n',
         ["extends unknown preset 'amazon'", "preset 'b'", "quality must be in 1..100"]),
    ],
)
def test_a_bad_presets_file_names_the_file_the_preset_and_the_fix(tmp_path, name, text, phrases) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(PresetError) as caught:
        load_presets(path)
    message = str(caught.value)
    assert str(path) in message
    for phrase in phrases:
        assert phrase in message, message


@pytest.mark.parametrize(
    "fields",
    [
        {"fit": "pad", "width": None, "height": 2000, "fill": 0.85},
        {"fit": "pad", "width": 2000, "height": 2000, "fill": 1.5},
        {"fit": "pad", "width": 2000, "height": 2000},
        {"fit": "cover", "width": 1080, "height": 1080, "fill": 0.8},
        {"fit": "cover", "width": 1080, "height": 1080, "long_side": 1080},
        {"fit": "long_side", "width": 800, "height": None, "long_side": 800},
        {"fit": "long_side", "long_side": 800, "extension": "png"},
        {"fit": "long_side", "long_side": 800, "min_quality": 95},
        {"fit": "long_side", "long_side": 800, "max_upscale": 0},
        {"fit": "long_side", "long_side": 800, "max_bytes": 0},
        {"fit": "long_side", "long_side": 80_000},
        {"fit": "long_side", "name": "a/b"},
    ],
)
def test_inconsistent_presets_are_rejected(fields: dict[str, object]) -> None:
    base = {"name": "bad", "format": "JPEG", "description": "test"}
    with pytest.raises(ValueError, match="preset '(bad|a/b)'"):
        Preset(**{**base, **fields})


def test_unknown_presets_are_all_named_with_a_hint_and_the_known_ones() -> None:
    with pytest.raises(UnknownPresetError) as caught:
        select_presets(["amazon_mian", "web", "tmall"], PRESETS)
    message = str(caught.value)
    assert "'amazon_mian' (did you mean 'amazon_main'?)" in message and "'tmall'" in message
    assert all(name in message for name in PRESETS) and isinstance(caught.value, PresetError)
    assert [p.name for p in select_presets(["web", "png", "web"], PRESETS)] == ["web", "png"]
    assert get_preset("web") is PRESETS["web"]


def test_the_table_lists_every_rule() -> None:
    text = presets_table(PRESETS)
    amazon = next(line for line in text.splitlines() if line.startswith("amazon_main"))
    for cell in ("2000x2000", "pad on white", "white, shadow removed", "85% (80%-90%)", "JPEG q90", "10 MB"):
        assert cell in amazon
    assert "crop to subject" in next(line for line in text.splitlines() if line.startswith("story_1080x1920"))
    assert len(text.splitlines()) == len(PRESETS) + 1
    assert (format_bytes(3 * MB), format_bytes(500_000), format_bytes(1234), format_bytes(None)) == ("3 MB", "500 KB", "1234 B", "-")


def test_whole_numbers_written_as_floats_are_taken(tmp_path) -> None:
    mine = tmp_path / "p.toml"
    mine.write_text('[big]\nextends = "web"\nmax_bytes = 2e6\nlong_side = 2048.0\n', encoding="utf-8")
    big = load_presets(mine)["big"]
    assert (big.max_bytes, big.long_side) == (2_000_000, 2048) and isinstance(big.long_side, int)


def test_the_readme_shows_the_current_presets_table() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert presets_table(PRESETS, markdown=True) in readme, "run `zimage-batch presets --markdown` and paste it into README.md"


def test_the_readme_presets_file_example_loads(tmp_path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "my_presets.toml"
    path.write_text(example, encoding="utf-8")
    presets = load_presets(path)
    assert presets["amazon_tight"].shadow == "keep" and presets["amazon_tight"].width == 2000
    assert (presets["lazada"].format, presets["lazada"].max_bytes) == ("WEBP", 2 * MB)


def test_a_format_this_pillow_cannot_encode_stops_before_any_work(tmp_path, monkeypatch, capsys) -> None:
    """Pillow before 11.3 has no AVIF encoder (pyproject allows 11.0): the shipped web_avif preset
    must stop the run or the postprocess command up front, not fail every job after generation."""
    from PIL import Image, features

    from conftest import write_csv, write_template
    from zimage_batch.cli import main

    real = features.check
    monkeypatch.setattr(features, "check", lambda name: False if name == "avif" else real(name))  # an AVIF-less Pillow
    assert unsupported([PRESETS["web"], PRESETS["web_webp"]]) == []
    (problem,) = unsupported([PRESETS["web_avif"]])
    assert "preset 'web_avif' writes AVIF, which this Pillow" in problem and "Pillow>=11.3" in problem
    catalog = write_csv(tmp_path / "c.csv", ["sku", "title"], [["S1", "Mug"]])
    template = write_template(tmp_path / "t.j2", "{{ title }}", "presets: [web, web_avif]")
    assert main(["plan", str(catalog), "-t", str(template), "--model", "tiny-random"]) == 2
    assert "t.j2: preset 'web_avif' writes AVIF" in capsys.readouterr().err
    Image.new("RGB", (64, 64), "white").save(tmp_path / "shot.png")
    code = main(["postprocess", str(tmp_path / "shot.png"), "-p", "web", "-p", "web_avif", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "web_avif" in err and "Traceback" not in err and not (tmp_path / "out").exists()
