"""Provenance inside the file, read back with an independent reader: Pillow plus xml.etree."""

import io
from xml.etree import ElementTree

import numpy as np
import pytest
from PIL import Image

from zimage_batch.provenance import (
    DIGITAL_SOURCE_TYPE, Stamp, disagreements, embed, parameters_text, parse_parameters, read_embedded,
)

FORMATS = ["PNG", "JPEG", "WEBP", "AVIF"]
NS = {"rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#", "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
      "zb": "urn:zimage-batch:provenance:1/", "xmp": "http://ns.adobe.com/xap/1.0/"}


def stamp(**kw) -> Stamp:
    fields = dict(job_id="0123456789abcdef01234567", sku="MUG-002", catalog="demo.csv", row=2, template="scene", variant=1,
                  prompt="国风咖啡杯 on a table, warm light: soft", negative_prompt="blurry, low quality", seed=11, image_seed=42,
                  width=256, height=256, steps=8, guidance_scale=0.0, max_sequence_length=512,
                  model="local:z-image@0a1b2c, v2", software="zimage-batch 0.1.0")
    fields.update(kw)
    return Stamp(**fields)


def encoded(fmt: str, **save) -> bytes:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def camera_exif() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "Canon"  # Make
    exif[0x0110] = "EOS R5"  # Model
    exif.get_ifd(0x8825)[2] = (48.0, 8.0, 0.0)  # GPSLatitude
    return exif.tobytes()


def independent_read(data: bytes) -> tuple[Image.Image, dict, str]:
    """XMP properties (via xml.etree) and the A1111 text, read with Pillow the way other tools do."""
    image = Image.open(io.BytesIO(data))
    packet = image.info["XML:com.adobe.xmp"] if image.format == "PNG" else image.info["xmp"]
    packet = packet.decode() if isinstance(packet, bytes) else packet
    root = ElementTree.fromstring(packet[packet.index("<x:xmpmeta") : packet.rindex("</x:xmpmeta>") + len("</x:xmpmeta>")])
    description = root.find("rdf:RDF/rdf:Description", NS)
    xmp = {child.tag: child.text for child in description}
    if image.format == "PNG":
        text = image.info["parameters"]
    else:
        comment = image.getexif().get_ifd(0x8769)[0x9286]
        assert comment[:8] == b"UNICODE\x00"
        text = comment[8:].decode("utf-16-be")
    return image, xmp, text


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_round_trips_xmp_and_a1111_parameters(fmt):
    original = encoded(fmt)
    data = embed(original, stamp())
    image, xmp, text = independent_read(data)
    assert image.format == fmt
    assert xmp[f"{{{NS['Iptc4xmpExt']}}}DigitalSourceType"] == DIGITAL_SOURCE_TYPE
    assert xmp[f"{{{NS['zb']}}}jobId"] == "0123456789abcdef01234567"
    assert xmp[f"{{{NS['zb']}}}imageSeed"] == "42" and xmp[f"{{{NS['zb']}}}model"] == "local:z-image@0a1b2c, v2"
    assert xmp[f"{{{NS['zb']}}}prompt"] == "国风咖啡杯 on a table, warm light: soft"
    assert xmp[f"{{{NS['xmp']}}}CreatorTool"] == "zimage-batch 0.1.0"
    lines = text.split("\n")
    assert lines[0] == "国风咖啡杯 on a table, warm light: soft" and lines[1] == "Negative prompt: blurry, low quality"
    assert lines[2].startswith("Steps: 8, CFG scale: 0.0, Seed: 42, Size: 256x256, ")
    assert "Job ID: 0123456789abcdef01234567" in lines[2] and "Planned seed: 11" in lines[2]
    # Metadata only: the pixels are the encoder's, untouched.
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(original)).convert("RGB")), np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_source_exif_is_dropped_and_embedding_twice_keeps_one_copy(fmt):
    source = encoded(fmt, exif=camera_exif())
    assert Image.open(io.BytesIO(source)).getexif().get(0x010F) == "Canon"
    once = embed(source, stamp())
    exif = Image.open(io.BytesIO(once)).getexif()
    assert 0x010F not in exif and 0x0110 not in exif and not exif.get_ifd(0x8825)
    if fmt != "PNG":
        assert exif[0x0131] == "zimage-batch 0.1.0"  # Software: ours
    again = embed(once, stamp(job_id="ffffffffffffffffffffffff"))
    assert again.count(b"<x:xmpmeta") == 1
    assert read_embedded(again).xmp["zb:jobId"] == "ffffffffffffffffffffffff"


def test_png_parameters_are_a_text_chunk_that_a1111_readers_find():
    ascii_stamp = stamp(prompt="a red mug", negative_prompt="")
    image = Image.open(io.BytesIO(embed(encoded("PNG"), ascii_stamp)))
    assert image.info["parameters"] == parameters_text(ascii_stamp)
    assert image.info["parameters"].split("\n")[0] == "a red mug" and "Negative prompt" not in image.info["parameters"]


def test_parameters_text_parses_back_with_quoted_values():
    s = stamp()
    parsed = parse_parameters(parameters_text(s))
    assert parsed["prompt"] == s.prompt and parsed["negative_prompt"] == s.negative_prompt
    assert parsed["Model"] == "local:z-image@0a1b2c, v2"  # has a comma and a colon: quoted, then unquoted
    assert (parsed["Seed"], parsed["Job ID"], parsed["Steps"], parsed["Size"]) == ("42", s.job_id, "8", "256x256")
    assert "Planned seed" not in parse_parameters(parameters_text(stamp(seed=42)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_embedded_agrees_and_names_what_disagrees(fmt):
    data = embed(encoded(fmt), stamp())
    found = read_embedded(data)
    assert found.format == fmt and disagreements(found, stamp()) == []
    problems = disagreements(found, stamp(job_id="another", image_seed=7))
    assert any("zb:jobId is '0123456789abcdef01234567', the manifest says 'another'" in p for p in problems)
    assert any("parameters Seed is '42', the manifest says '7'" in p for p in problems)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_without_our_metadata_reads_empty(fmt):
    found = read_embedded(encoded(fmt))
    assert found.empty and set(disagreements(found, stamp())) == {"no XMP", "no A1111 parameters"}


def test_avif_with_metadata_already_is_refused_and_other_bytes_are_not_images():
    with pytest.raises(ValueError, match="already carries EXIF or XMP"):
        embed(encoded("AVIF", exif=camera_exif()), stamp())
    with pytest.raises(ValueError, match="not a JPEG, PNG, WebP or AVIF"):
        embed(b"GIF89a....", stamp())


def test_stamp_of_a_job_equals_stamp_of_its_record():
    from test_generate import job
    from test_manifest import record

    j = job(prompt="a mug")
    assert record(j).stamp() == Stamp.of(j.to_dict(), j.seed, record(j).stamp().software)


@pytest.mark.parametrize("field, value, xmp_name, parameters_name", [
    ("prompt", "a different product, made by hand", "zb:prompt", "prompt"),
    ("negative_prompt", "x", "zb:negativePrompt", "negative_prompt"),
    ("seed", 1, "zb:seed", "Planned seed"),
    ("width", 2048, "zb:width", "Size"),
    ("height", 512, "zb:height", "Size"),
    ("steps", 50, "zb:steps", "Steps"),
    ("guidance_scale", 4.5, "zb:guidanceScale", "CFG scale"),
    ("max_sequence_length", 256, "zb:maxSequenceLength", "Max sequence length"),
    ("model", "tiny-random/v1", "zb:model", "Model"),
    ("software", "zimage-batch 9.9", "xmp:CreatorTool", "Version"),
    ("sku", "../../../escaped", "zb:sku", None),
    ("catalog", "other.csv", "zb:catalog", None),
    ("row", 9, "zb:row", None),
    ("template", "studio", "zb:template", None),
    ("variant", 3, "zb:variant", None),
])
def test_every_field_of_the_stamp_is_compared(field, value, xmp_name, parameters_name):
    found = read_embedded(embed(encoded("JPEG"), stamp()))
    problems = disagreements(found, stamp(**{field: value}))
    assert any(p.startswith(f"XMP {xmp_name} is ") and repr(str(value)) in p for p in problems), problems
    in_parameters = [p for p in problems if p.startswith("parameters ")]
    if parameters_name is None:  # the A1111 text does not hold it
        assert in_parameters == []
    else:
        assert any(p.startswith(f"parameters {parameters_name} is ") for p in in_parameters), problems


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_prompt_with_a_negative_prompt_line_is_left_out_of_the_a1111_text(fmt):
    tricky = stamp(prompt="a mug\nNegative prompt: not really, part of the prompt", negative_prompt="blurry")
    found = read_embedded(embed(encoded(fmt), tricky))
    # Read as any A1111 reader does, the text no longer hands part of the prompt to the negative prompt.
    assert found.parameters["prompt"] == "" and found.parameters["negative_prompt"] == "blurry"
    assert found.xmp["zb:prompt"] == tricky.prompt  # the XMP keeps it exactly
    assert disagreements(found, tricky) == []
    assert any(p.startswith("XMP zb:prompt is ") for p in disagreements(found, stamp(prompt="a mug", negative_prompt="blurry")))
    plain = parse_parameters(parameters_text(stamp(prompt="a mug", negative_prompt="a\nNegative prompt: b")))
    assert plain["prompt"] == "a mug" and plain["negative_prompt"] == "a\nNegative prompt: b"
