"""Provenance inside the file: what every delivered image says about how it was made.

Pure functions of bytes (no torch, no I/O). A ``Stamp`` is built from a job (or its manifest
record alone) and written into the encoded file without re-encoding any pixels:

* XMP with IPTC ``Iptc4xmpExt:DigitalSourceType`` = trainedAlgorithmicMedia (the AI-media mark
  Google Merchant Center and the EU AI Act look for) and the job's fields in the ``zb:``
  namespace: JPEG APP1, WebP ``XMP `` chunk, AVIF ``mime`` item, PNG iTXt ``XML:com.adobe.xmp``.
* The AUTOMATIC1111 ``parameters`` text (prompt, ``Negative prompt:`` line, ``Steps: 8, ...``):
  a PNG text chunk ``parameters``; EXIF UserComment in JPEG, WebP and AVIF (with EXIF Software).
  A prompt with a line starting ``Negative prompt:`` is left out of it (see ``parameters_text``).

Any EXIF or XMP already in the bytes (a camera's, an input photo's) is dropped, so ours is the only
metadata. ``read_embedded`` reads it back with Pillow and xml.etree; ``disagreements`` compares it,
field by field, with what the manifest says.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from xml.etree import ElementTree

from pydantic import BaseModel

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
PARAMETERS_KEY = "parameters"
PNG_XMP_KEY = "XML:com.adobe.xmp"
ZB_NS = "urn:zimage-batch:provenance:1/"
_NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "zb": ZB_NS,
}
_JPEG_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
_JPEG_EXIF_HEADER = b"Exif\x00\x00"
_JPEG_SEGMENT_MAX = 65533  # payload bytes of one APPn segment
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


class Stamp(BaseModel, frozen=True):
    """What every file of one job carries: enough to say how it was made and to find its record."""

    job_id: str
    sku: str
    catalog: str
    row: int
    template: str
    variant: int
    prompt: str
    negative_prompt: str
    seed: int
    image_seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    max_sequence_length: int
    model: str
    software: str

    @classmethod
    def of(cls, source: Mapping, image_seed: int, software: str) -> Stamp:
        """The stamp of a job or a manifest record (both name their fields alike)."""
        fields = {name: source[name] for name in cls.model_fields if name not in ("image_seed", "software")}
        return cls(**fields, image_seed=image_seed, software=software)


def software_name(version: str) -> str:
    """How the software names itself in files: ``zimage-batch 0.1.0``."""
    return f"zimage-batch {version}"


# --- AUTOMATIC1111 "parameters" text ---------------------------------------------------------


def parameters_text(stamp: Stamp) -> str:
    """The A1111 ``parameters`` text: prompt, ``Negative prompt: ...`` line, then one line of settings.

    A prompt with a line that starts ``Negative prompt:`` cannot be told apart from the negative prompt
    in this format, so for such a prompt the text leaves the prompt out (an empty first line); the XMP
    ``zb:prompt``, the C2PA assertion and the manifest still hold it exactly.
    """
    settings = {
        "Steps": stamp.steps,
        "CFG scale": stamp.guidance_scale,
        "Seed": stamp.image_seed,
        "Size": f"{stamp.width}x{stamp.height}",
        "Model": stamp.model,
        "Max sequence length": stamp.max_sequence_length,
        "Job ID": stamp.job_id,
        "Version": stamp.software,
    }
    if stamp.image_seed != stamp.seed:
        settings["Planned seed"] = stamp.seed  # the first attempt's image was black or blank
    ambiguous = any(line.startswith(_NEGATIVE) for line in stamp.prompt.split("\n"))
    lines = ["" if ambiguous else stamp.prompt]
    if stamp.negative_prompt:
        lines.append(f"{_NEGATIVE} {stamp.negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in settings.items()))
    return "\n".join(lines)


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


_NEGATIVE = "Negative prompt:"
_SETTING = re.compile(r'\s*([A-Za-z][\w \-/]*):\s*("(?:\\.|[^"\\])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    """Read an A1111 ``parameters`` text back: ``prompt``, ``negative_prompt`` and every setting."""
    lines = text.split("\n")
    settings_line = lines.pop() if len(lines) > 1 and len(_SETTING.findall(lines[-1])) >= 3 else ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(_NEGATIVE) and not in_negative:
            in_negative = True
            line = line[len(_NEGATIVE):].lstrip()
        (negative if in_negative else prompt).append(line)
    parsed = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    for key, value in _SETTING.findall(settings_line):
        parsed[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return parsed


# --- XMP ---------------------------------------------------------------------------------------


def build_xmp(stamp: Stamp) -> bytes:
    """An XMP packet marking the file as AI-generated, with the job's fields under ``zb:``."""
    for prefix, uri in _NS.items():
        ElementTree.register_namespace(prefix, uri)
    root = ElementTree.Element(f"{{{_NS['x']}}}xmpmeta")
    rdf = ElementTree.SubElement(root, f"{{{_NS['rdf']}}}RDF")
    description = ElementTree.SubElement(rdf, f"{{{_NS['rdf']}}}Description", {f"{{{_NS['rdf']}}}about": ""})
    ElementTree.SubElement(description, f"{{{_NS['Iptc4xmpExt']}}}DigitalSourceType").text = DIGITAL_SOURCE_TYPE
    ElementTree.SubElement(description, f"{{{_NS['xmp']}}}CreatorTool").text = _xmp_text(stamp.software)
    for name, value in stamp.model_dump().items():
        if name != "software":
            ElementTree.SubElement(description, f"{{{ZB_NS}}}{_camel(name)}").text = _xmp_text(value)
    body = ElementTree.tostring(root, encoding="unicode")
    return f'<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>{body}<?xpacket end="w"?>'.encode("utf-8")


def _xmp_text(value: object) -> str:
    """A value as XMP text (characters XML cannot hold become U+FFFD)."""
    return _XML_INVALID.sub("\ufffd", str(value))


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def parse_xmp(packet: bytes | str) -> dict[str, str]:
    """Simple XMP properties, element or attribute form, keyed ``prefix:Name`` for the known namespaces."""
    text = packet.decode("utf-8", "replace") if isinstance(packet, bytes) else packet
    for open_tag, close_tag in (("<x:xmpmeta", "</x:xmpmeta>"), ("<rdf:RDF", "</rdf:RDF>")):
        start, end = text.find(open_tag), text.rfind(close_tag)
        if 0 <= start < end:
            root = ElementTree.fromstring(text[start : end + len(close_tag)])
            break
    else:
        raise ValueError("no XMP packet (x:xmpmeta or rdf:RDF) found")
    prefixes = {uri: prefix for prefix, uri in _NS.items()}
    found: dict[str, str] = {}

    def key(tag: str) -> str | None:
        uri, _, local = tag[1:].partition("}") if tag.startswith("{") else ("", "", tag)
        return f"{prefixes[uri]}:{local}" if uri in prefixes and uri != _NS["rdf"] else None

    for description in root.iter(f"{{{_NS['rdf']}}}Description"):
        for attribute, value in description.attrib.items():
            if (name := key(attribute)) is not None:
                found[name] = value
        for child in description:
            if (name := key(child.tag)) is not None and len(child) == 0:
                found[name] = child.text or ""
    return found


# --- EXIF (for JPEG, WebP, AVIF) ---------------------------------------------------------------


def build_exif(stamp: Stamp) -> bytes:
    """A big-endian TIFF block with Software and UserComment (the A1111 text, as A1111 does for JPEG)."""
    text = parameters_text(stamp)
    comment = b"ASCII\x00\x00\x00" + text.encode("ascii") if text.isascii() else b"UNICODE\x00" + text.encode("utf-16-be")
    software = stamp.software.encode("utf-8") + b"\x00"
    # Layout: header (8) | IFD0: 2 entries (2 + 24 + 4) | Exif IFD: 1 entry (2 + 12 + 4) | data
    ifd0_at, exif_at = 8, 8 + 30
    data_at = exif_at + 18
    software_at = data_at
    comment_at = software_at + len(software) + (len(software) & 1)
    out = bytearray(b"MM\x00\x2a" + struct.pack(">I", ifd0_at))
    out += struct.pack(">H", 2)
    out += struct.pack(">HHII", 0x0131, 2, len(software), software_at)  # Software, ASCII
    out += struct.pack(">HHII", 0x8769, 4, 1, exif_at)  # Exif IFD pointer, LONG
    out += struct.pack(">I", 0)
    out += struct.pack(">H", 1)
    out += struct.pack(">HHII", 0x9286, 7, len(comment), comment_at)  # UserComment, UNDEFINED
    out += struct.pack(">I", 0)
    out += software + (b"\x00" if len(software) & 1 else b"")
    out += comment
    return bytes(out)


def decode_user_comment(value: bytes, big_endian: bool = True) -> str:
    """The text of an EXIF UserComment (8-byte character code, then the text)."""
    code, body = value[:8], value[8:]
    if code.startswith(b"UNICODE"):
        return body.decode("utf-16-be" if big_endian else "utf-16-le", "replace")
    return body.rstrip(b"\x00").decode("utf-8" if code.startswith(b"\x00") else "latin-1", "replace")


# --- embedding into encoded bytes -----------------------------------------------------------


def sniff_format(data: bytes) -> str:
    """``JPEG``, ``PNG``, ``WEBP`` or ``AVIF`` from the magic bytes; ValueError for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "AVIF"
    raise ValueError("not a JPEG, PNG, WebP or AVIF file")


def embed(data: bytes, stamp: Stamp) -> bytes:
    """The same image with our XMP and A1111 parameters embedded (pixels untouched, other EXIF/XMP dropped)."""
    fmt = sniff_format(data)
    xmp = build_xmp(stamp)
    if fmt == "PNG":
        return _embed_png(data, xmp, parameters_text(stamp))
    exif = build_exif(stamp)
    if fmt == "JPEG":
        return _embed_jpeg(data, exif, xmp)
    if fmt == "WEBP":
        return _embed_webp(data, exif, xmp)
    return _embed_avif(data, exif, xmp)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_text(key: str, text: str) -> bytes:
    try:
        return _png_chunk(b"tEXt", key.encode("latin-1") + b"\x00" + text.encode("latin-1"))
    except UnicodeEncodeError:  # iTXt: keyword, no compression, no language, no translated keyword
        return _png_chunk(b"iTXt", key.encode("latin-1") + b"\x00\x00\x00\x00\x00" + text.encode("utf-8"))


def _embed_png(data: bytes, xmp: bytes, parameters: str) -> bytes:
    ours = {PARAMETERS_KEY.encode(), PNG_XMP_KEY.encode()}
    out = bytearray(data[:8])
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        chunk = data[pos : pos + 12 + length]
        pos += 12 + length
        if kind in (b"tEXt", b"iTXt", b"zTXt") and chunk[8:].split(b"\x00", 1)[0] in ours or kind == b"eXIf":
            continue  # replaced by ours, or source EXIF
        out += chunk
        if kind == b"IHDR":  # text before the image data, where every reader looks
            out += _png_chunk(b"iTXt", PNG_XMP_KEY.encode() + b"\x00\x00\x00\x00\x00" + xmp)
            out += _png_text(PARAMETERS_KEY, parameters)
    return bytes(out)


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    if len(payload) > _JPEG_SEGMENT_MAX:
        raise ValueError(f"metadata of {len(payload)} bytes does not fit one JPEG segment ({_JPEG_SEGMENT_MAX} max); shorten the prompt")
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def _embed_jpeg(data: bytes, exif: bytes, xmp: bytes) -> bytes:
    ours = _jpeg_segment(0xE1, _JPEG_EXIF_HEADER + exif) + _jpeg_segment(0xE1, _JPEG_XMP_HEADER + xmp)
    out = bytearray(data[:2])
    pos, inserted = 2, False
    while pos < len(data):
        if data[pos] != 0xFF:
            raise ValueError("malformed JPEG: expected a marker")
        marker = data[pos + 1]
        if marker == 0xDA or not 0xE0 <= marker <= 0xEF and not inserted:  # scan or first non-APP segment
            if not inserted:
                out += ours
                inserted = True
            if marker == 0xDA:
                return bytes(out + data[pos:])
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        segment = data[pos : pos + 2 + length]
        pos += 2 + length
        if marker == 0xE1 and (segment[4:].startswith(_JPEG_EXIF_HEADER) or segment[4:].startswith(_JPEG_XMP_HEADER)):
            continue  # source EXIF or XMP: ours replaces it
        out += segment
        if marker == 0xE0 and not inserted:  # after JFIF APP0, which must come first
            out += ours
            inserted = True
    raise ValueError("malformed JPEG: no image data")


def _riff_chunk(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("<I", len(payload)) + payload + (b"\x00" if len(payload) & 1 else b"")


def _embed_webp(data: bytes, exif: bytes, xmp: bytes) -> bytes:
    from PIL import Image

    chunks = []
    pos = 12
    while pos + 8 <= len(data):
        kind = data[pos : pos + 4]
        (size,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        chunks.append((kind, data[pos + 8 : pos + 8 + size]))
        pos += 8 + size + (size & 1)
    kept = [(k, p) for k, p in chunks if k not in (b"VP8X", b"EXIF", b"XMP ")]
    vp8x = next((p for k, p in chunks if k == b"VP8X"), None)
    if vp8x is None:
        with Image.open(io.BytesIO(data)) as image:
            width, height, alpha = image.width, image.height, image.mode in ("RGBA", "LA")
        flags = 0x10 if alpha else 0
        canvas = struct.pack("<I", width - 1)[:3] + struct.pack("<I", height - 1)[:3]
    else:
        flags, canvas = vp8x[0], vp8x[4:10]
    header = bytes([flags | 0x08 | 0x04, 0, 0, 0]) + canvas  # + EXIF, + XMP
    body = _riff_chunk(b"VP8X", header) + b"".join(_riff_chunk(k, p) for k, p in kept)
    body += _riff_chunk(b"EXIF", exif) + _riff_chunk(b"XMP ", xmp)
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


# AVIF is ISOBMFF: metadata are items of the 'meta' box (infe in iinf, data located by iloc,
# linked to the image by an iref 'cdsc'). The new items' data go in a second 'mdat' at the end;
# the existing items' file offsets move by however much the 'meta' box grew.


def _boxes(data: bytes, start: int, end: int) -> list[tuple[bytes, int, int, int]]:
    """(type, start, header size, total size) of the boxes in data[start:end]."""
    found = []
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1:
            (size,) = struct.unpack(">Q", data[pos + 8 : pos + 16])
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise ValueError(f"malformed AVIF: box {kind!r} at {pos} overruns its parent")
        found.append((kind, pos, header, size))
        pos += size
    return found


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload) + 8) + kind + payload


def _uint(data: bytes, pos: int, size: int) -> int:
    return int.from_bytes(data[pos : pos + size], "big") if size else 0


@dataclass
class _Iloc:
    version: int
    index_size: int
    items: list[list]  # [item_id, construction_method, data_reference_index, base_offset, [[index, offset, length]]]

    @classmethod
    def parse(cls, body: bytes) -> _Iloc:
        version = body[0]
        offset_size, length_size = body[4] >> 4, body[4] & 15
        base_size, index_size = body[5] >> 4, (body[5] & 15) if version in (1, 2) else 0
        pos = 6
        id_size = 4 if version == 2 else 2
        count = _uint(body, pos, id_size)
        pos += id_size
        items = []
        for _ in range(count):
            item_id = _uint(body, pos, id_size)
            pos += id_size
            method = 0
            if version in (1, 2):
                method = _uint(body, pos, 2) & 15
                pos += 2
            reference = _uint(body, pos, 2)
            base = _uint(body, pos + 2, base_size)
            pos += 2 + base_size
            extent_count = _uint(body, pos, 2)
            pos += 2
            extents = []
            for _ in range(extent_count):
                index = _uint(body, pos, index_size)
                offset = _uint(body, pos + index_size, offset_size)
                length = _uint(body, pos + index_size + offset_size, length_size)
                pos += index_size + offset_size + length_size
                extents.append([index, offset, length])
            items.append([item_id, method, reference, base, extents])
        return cls(version, index_size, items)

    def build(self, size: int) -> bytes:
        """The box with ``size``-byte offsets and lengths (4 or 8), and base offsets only when used.

        (c2pa-python 0.38 shifts items twice when base offsets are present, so leave them out.)
        """
        id_size = 4 if self.version == 2 else 2
        base_size = size if any(item[3] for item in self.items) else 0
        out = bytearray([self.version, 0, 0, 0, size << 4 | size, base_size << 4 | self.index_size])
        out += len(self.items).to_bytes(id_size, "big")
        for item_id, method, reference, base, extents in self.items:
            out += item_id.to_bytes(id_size, "big")
            if self.version in (1, 2):
                out += method.to_bytes(2, "big")
            out += reference.to_bytes(2, "big") + base.to_bytes(base_size, "big") + len(extents).to_bytes(2, "big")
            for index, offset, length in extents:
                out += index.to_bytes(self.index_size, "big") + offset.to_bytes(size, "big") + length.to_bytes(size, "big")
        return _box(b"iloc", bytes(out))


def _embed_avif(data: bytes, exif: bytes, xmp: bytes) -> bytes:
    top = _boxes(data, 0, len(data))
    meta = next((b for b in top if b[0] == b"meta"), None)
    if meta is None:
        raise ValueError("malformed AVIF: no 'meta' box")
    _, meta_at, meta_header, meta_size = meta
    children = {kind: (start, header, size) for kind, start, header, size in _boxes(data, meta_at + meta_header + 4, meta_at + meta_size)}
    if b"iloc" not in children or b"iinf" not in children or b"pitm" not in children:
        raise ValueError("malformed AVIF: 'meta' lacks iloc, iinf or pitm")

    def body(kind: bytes) -> bytes:
        start, header, size = children[kind]
        return data[start + header : start + size]

    pitm = body(b"pitm")
    primary = _uint(pitm, 4, 4 if pitm[0] else 2)
    iinf = body(b"iinf")
    count_size = 2 if iinf[0] == 0 else 4
    entries = _boxes(iinf, 4 + count_size, len(iinf))
    kinds = {iinf[s + h + 8 + 2 * (iinf[s + h] == 3) :][:4] for _, s, h, _ in entries if iinf[s + h] >= 2}
    if b"Exif" in kinds or b"mime" in kinds:
        raise ValueError("this AVIF already carries EXIF or XMP items; embed into a file without metadata")
    iloc = _Iloc.parse(body(b"iloc"))
    exif_id = max([item[0] for item in iloc.items] + [primary]) + 1
    xmp_id = exif_id + 1
    if xmp_id > 0xFFFF:
        raise ValueError("too many items in this AVIF")
    infe = [
        _box(b"infe", bytes([2, 0, 0, 0]) + struct.pack(">HH", exif_id, 0) + b"Exif" + b"Exif\x00"),
        _box(b"infe", bytes([2, 0, 0, 0]) + struct.pack(">HH", xmp_id, 0) + b"mime" + b"XMP\x00application/rdf+xml\x00"),
    ]
    new_iinf = _box(b"iinf", iinf[:4] + (len(entries) + 2).to_bytes(count_size, "big") + iinf[4 + count_size :] + b"".join(infe))
    id_size = 4 if b"iref" in children and body(b"iref")[0] == 1 else 2
    refs = b"".join(_box(b"cdsc", item.to_bytes(id_size, "big") + (1).to_bytes(2, "big") + primary.to_bytes(id_size, "big"))
                    for item in (exif_id, xmp_id))
    new_iref = _box(b"iref", (body(b"iref") if b"iref" in children else bytes(4)) + refs)
    exif_payload = struct.pack(">I", 6) + _JPEG_EXIF_HEADER + exif
    field_size = 4 if len(data) + len(exif_payload) + len(xmp) + (1 << 16) < 1 << 32 else 8

    def rebuild_meta() -> bytes:
        parts = []
        for kind, start, header, size in _boxes(data, meta_at + meta_header + 4, meta_at + meta_size):
            if kind == b"iloc":
                parts.append(iloc.build(field_size))
            elif kind == b"iinf":
                parts.append(new_iinf + (new_iref if b"iref" not in children else b""))
            elif kind == b"iref":
                parts.append(new_iref)
            else:
                parts.append(data[start : start + size])
        return _box(b"meta", data[meta_at + meta_header : meta_at + meta_header + 4] + b"".join(parts))

    # Field sizes are fixed up front, so one pass with placeholder offsets measures the growth.
    iloc.items += [[exif_id, 0, 0, 0, [[0, 0, len(exif_payload)]]], [xmp_id, 0, 0, 0, [[0, 0, len(xmp)]]]]
    growth = len(rebuild_meta()) - meta_size
    meta_end = meta_at + meta_size
    for _, method, reference, base, extents in iloc.items[:-2]:
        if method == 0 and reference == 0:  # data in this file, at absolute offsets
            for extent in extents:
                extent[1] += growth if base + extent[1] >= meta_end else 0
    tail = len(data) + growth + 8
    iloc.items[-2][4][0][1] = tail
    iloc.items[-1][4][0][1] = tail + len(exif_payload)
    new_meta = rebuild_meta()
    return data[:meta_at] + new_meta + data[meta_end:] + _box(b"mdat", exif_payload + xmp)


# --- reading back ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Embedded:
    """What a file says about itself: its XMP properties and its A1111 parameters, if any."""

    format: str
    xmp: dict[str, str] | None
    parameters: dict[str, str] | None
    problems: tuple[str, ...] = ()  # metadata present but unreadable

    @property
    def empty(self) -> bool:
        return not self.xmp and not self.parameters


def read_embedded(data: bytes) -> Embedded:
    """Read our metadata back with Pillow (headers only, no pixel decoding) and xml.etree."""
    from PIL import Image

    fmt = sniff_format(data)
    problems: list[str] = []
    with Image.open(io.BytesIO(data)) as image:
        info = dict(image.info)
        text = info.get(PARAMETERS_KEY) if fmt == "PNG" else None
        packet = info.get(PNG_XMP_KEY) if fmt == "PNG" else info.get("xmp")
        if fmt != "PNG" and info.get("exif"):
            exif = image.getexif()
            comment = exif.get_ifd(0x8769).get(0x9286)
            if isinstance(comment, bytes):
                raw = info["exif"]
                big_endian = raw[6:8] == b"MM" if raw.startswith(_JPEG_EXIF_HEADER) else raw[:2] == b"MM"
                text = decode_user_comment(comment, big_endian)
    xmp = None
    if packet:
        try:
            xmp = parse_xmp(packet)
        except (ValueError, ElementTree.ParseError) as exc:
            problems.append(f"unreadable XMP ({exc})")
    return Embedded(fmt, xmp, parse_parameters(text) if text else None, tuple(problems))


def disagreements(embedded: Embedded, stamp: Stamp) -> list[str]:
    """Why the embedded metadata does not match the stamp the manifest implies (empty when it does).

    Every field of the stamp is compared: the XMP ``zb:`` properties (and ``xmp:CreatorTool``) with
    the stamp's values, the A1111 parameters with what ``parameters_text`` writes for the stamp.
    """
    problems = list(embedded.problems)
    if embedded.xmp is None:
        problems.append("no XMP")
    else:
        source_type = embedded.xmp.get("Iptc4xmpExt:DigitalSourceType")
        if source_type != DIGITAL_SOURCE_TYPE:
            problems.append(f"XMP DigitalSourceType is {source_type!r}, expected trainedAlgorithmicMedia")
        for name, expected in _xmp_fields(stamp).items():
            got = embedded.xmp.get(name)
            if got is not None:
                got = _newlines(got)
            if got != _newlines(expected):  # an XML parser reads a line break written as \r\n or \r as \n
                problems.append(f"XMP {name} is {_short(got)}, the manifest says {_short(expected)}")
    if embedded.parameters is None:
        problems.append("no A1111 parameters")
    else:
        expected_parameters = parse_parameters(parameters_text(stamp))
        for name in dict.fromkeys([*expected_parameters, *embedded.parameters]):
            got, expected = embedded.parameters.get(name), expected_parameters.get(name)
            if got != expected:
                problems.append(f"parameters {name} is {_short(got)}, the manifest says {_short(expected)}")
    return problems


def _xmp_fields(stamp: Stamp) -> dict[str, str]:
    """The XMP properties ``build_xmp`` writes for the stamp's fields, as text."""
    fields = {f"zb:{_camel(name)}": _xmp_text(value) for name, value in stamp.model_dump().items() if name != "software"}
    return {**fields, "xmp:CreatorTool": _xmp_text(stamp.software)}


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _short(value: str | None) -> str:
    """A value for a message: quoted, and cut in the middle when long; "absent" for None."""
    return "absent" if value is None else cut_middle(repr(value))


def cut_middle(text: str, limit: int = 80) -> str:
    """``text`` cut in the middle when longer than ``limit`` (a prompt can be hundreds of characters)."""
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2 :]}"


@dataclass(frozen=True)
class Sealer:
    """Finishes a job's encoded files: embeds its stamp, then signs with C2PA when a signer is given."""

    software: str
    signer: object | None = None  # a signing.C2paSigner

    @property
    def signed_by(self) -> str | None:
        """The signing certificate's fingerprint (``sha256:<hex>``), or None: files are not signed."""
        return None if self.signer is None else self.signer.credentials.fingerprint

    def seal(self, data: bytes, stamp: Stamp, title: str) -> bytes:
        """The final bytes of one file (hash these, not the encoder's output)."""
        sealed = embed(data, stamp)
        return sealed if self.signer is None else self.signer.sign(sealed, stamp, title)
