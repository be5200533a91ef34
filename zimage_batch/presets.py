"""Output presets as data: frame, background, product fill bounds, format, quality and file-size cap.

The shipped presets live in ``presets.toml`` beside this module (its header documents every
field). A user adds presets, or replaces shipped ones, with a TOML or YAML file of the same
shape (``--presets-file``); ``extends = "amazon_main"`` starts a preset from another one's
fields. ``load_presets`` returns the merged set; every problem in a file is reported at once.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .errors import PresetError

EXTENSIONS = {"JPEG": ("jpg", "jpeg"), "WEBP": ("webp",), "AVIF": ("avif",), "PNG": ("png",)}
MAX_SIDE = 8192
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# `zimage-batch postprocess` writes OUT/<preset>/ beside its own OUT/rejected/ and OUT/postprocess.jsonl
# (postprocess_files.REJECTED, REPORT): a preset of either name would write into them.
RESERVED_NAMES = ("rejected", "postprocess.jsonl")
_WHOLE_NUMBERS = ("width", "height", "long_side", "quality", "min_quality")
_NUMBERS = ("fill", "fill_min", "fill_max", "max_upscale")
_BYTES = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB)?\s*", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3}


class UnknownPresetError(PresetError, ValueError):
    """A preset name that is not among the known presets."""


class Preset(BaseModel):
    """One delivered file: frame geometry, background, product fill, encoding and size cap."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    fit: Literal["pad", "cover", "long_side"]
    width: int | None = None
    height: int | None = None
    long_side: int | None = None
    background: Literal["white", "keep"] = "keep"
    shadow: Literal["remove", "keep"] = "remove"
    fill: float | None = None
    fill_min: float | None = None
    fill_max: float | None = None
    max_upscale: float = 4.0
    format: Literal["JPEG", "WEBP", "AVIF", "PNG"]
    quality: int = 90
    min_quality: int = 60
    max_bytes: int | None = None
    extension: str = ""

    @model_validator(mode="before")
    @classmethod
    def _default_extension(cls, data: Any) -> Any:
        """Without an extension, use the format's usual one."""
        if isinstance(data, dict) and not data.get("extension") and data.get("format") in EXTENSIONS:
            data = {**data, "extension": EXTENSIONS[data["format"]][0]}
        return data

    @field_validator(*_WHOLE_NUMBERS, mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        """Only a whole number (1000, or 1000.0 and 1e3 as TOML and YAML may write it): lax coercion
        would read `true` as 1 and "1000" or 1000.5 as numbers."""
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"must be a whole number such as 1000, got {_shown(value)}")
        return value

    @field_validator(*_NUMBERS, mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        """Only a finite number: lax coercion would read `true` as 1.0."""
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ValueError(f"must be a finite number such as 0.85, got {_shown(value)}")
        return value

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _parse_bytes(cls, value: Any) -> Any:
        """Accept a byte count or a size such as "3 MB" (decimal units: 1 MB = 1,000,000 bytes)."""
        if isinstance(value, float) and value.is_integer():  # 2e6
            value = int(value)
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError(f"must be a whole byte count or a size such as '1 MB' or '1.5 MB', got {_shown(value)}")
        if isinstance(value, str):
            match = _BYTES.fullmatch(value)
            if match is None:
                raise ValueError(f"{value!r} is not a size; write a byte count or e.g. '500 KB', '3 MB'")
            return round(float(match[1]) * _UNITS[(match[2] or "B").upper()])
        return value

    @model_validator(mode="after")
    def _check_consistent(self) -> Preset:
        """Reject combinations of fields that rendering could not honour."""
        problems = _problems(self)
        if problems:
            raise ValueError(f"preset {self.name!r}: " + "; ".join(problems))
        return self

    @property
    def white(self) -> bool:
        """Whether the product is cut out onto pure white."""
        return self.background == "white"

    def fill_bounds(self) -> tuple[float, float] | None:
        """(low, high) a delivered product fill must meet, or None when unbounded."""
        if self.fill_min is None and self.fill_max is None:
            return None
        return (self.fill_min or 0.0, self.fill_max or 1.0)


def _shown(value: Any) -> str:
    """A value as the presets file wrote it (TOML and YAML write true/false)."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


_NOT_FOR_FIT = {"long_side": ("width", "height", "fill"), "cover": ("long_side", "fill"), "pad": ("long_side",)}


def _problems(p: Preset) -> list[str]:
    """Everything inconsistent in a preset, as fixes a user can act on."""
    problems = []
    if not _NAME.fullmatch(p.name):
        problems.append("a name is 1-64 letters, digits, '_', '.' or '-' (it names an output folder); rename the preset")
    elif p.name.lower() in RESERVED_NAMES:  # lower: a case-insensitive file system mixes up Rejected and rejected
        problems.append(f"the name {p.name!r} is taken by postprocess's own OUT/{p.name.lower()} (names "
                        f"{' and '.join(RESERVED_NAMES)} are reserved); rename the preset")
    if p.fit in ("pad", "cover"):
        if not (p.width and p.height and 0 < p.width <= MAX_SIDE and 0 < p.height <= MAX_SIDE):
            problems.append(f"fit={p.fit!r} needs width and height in 1..{MAX_SIDE}, got {p.width}x{p.height}")
        if p.long_side is not None:
            problems.append(f"fit={p.fit!r} sizes by width and height; remove long_side")
    else:
        if p.width is not None or p.height is not None:
            problems.append("fit='long_side' sizes by long_side; remove width and height")
        if p.long_side is not None and not 0 < p.long_side <= MAX_SIDE:
            problems.append(f"long_side must be in 1..{MAX_SIDE} or unset (keep the size), got {p.long_side}")
    if p.fit == "pad" and (p.fill is None or not 0 < p.fill <= 1):
        problems.append(f"fit='pad' needs 0 < fill <= 1 (the product's share of the frame, e.g. 0.85), got {p.fill}")
    if p.fit != "pad" and p.fill is not None:
        problems.append(f"fill sets the product size only with fit='pad'; with fit={p.fit!r} use fill_min/fill_max")
    for key in ("fill_min", "fill_max"):
        value = getattr(p, key)
        if value is not None and not 0 < value <= 1:
            problems.append(f"{key} must be in (0, 1], got {value}")
    low, high = p.fill_bounds() or (0.0, 1.0)
    if low > high:
        problems.append(f"fill_min {low} is above fill_max {high}")
    elif p.fill is not None and not low <= p.fill <= high:
        problems.append(f"fill {p.fill} is outside fill_min..fill_max ({low}..{high})")
    if not p.max_upscale > 0:
        problems.append(f"max_upscale must be > 0, got {p.max_upscale}")
    if not 1 <= p.quality <= 100:
        problems.append(f"quality must be in 1..100, got {p.quality}")
    if not 1 <= p.min_quality <= p.quality:
        problems.append(f"min_quality must be in 1..quality ({p.quality}), got {p.min_quality}")
    if p.max_bytes is not None and p.max_bytes <= 0:
        problems.append(f"max_bytes must be > 0, got {p.max_bytes}")
    if p.extension not in EXTENSIONS[p.format]:
        problems.append(f"extension {p.extension!r} does not fit {p.format}; use {EXTENSIONS[p.format][0]!r}")
    return problems


def _read_mapping(path: Path) -> dict[str, Any]:
    """The top-level mapping of a TOML or YAML presets file; PresetError naming the file otherwise."""
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise PresetError(f"Presets file {path} must end in .toml, .yaml or .yml (got {suffix or 'no suffix'}).")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PresetError(f"Presets file {path} does not exist. Check the path (see `zimage-batch presets` for the shipped ones).") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError(f"Presets file {path} cannot be read as UTF-8 text: {exc}.") from None
    try:
        data = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())
        raise PresetError(f"Presets file {path} is not valid {'TOML' if suffix == '.toml' else 'YAML'}: {detail}.") from None
    if not isinstance(data, dict) or not data:
        raise PresetError(
            f"Presets file {path} must hold one table per preset (e.g. [my_preset] with fit, width, height, format), "
            f"got {type(data).__name__ if data else 'nothing'}."
        )
    return data


def _validation_problems(exc: ValidationError) -> str:
    """A pydantic error as 'field: message; ...' without pydantic's prefixes; unknown fields get a hint."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(field, Preset.model_fields, n=1)
            parts.append(f"{field}: unknown field" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f"; known fields: {', '.join(f for f in Preset.model_fields if f != 'name')}, extends")
            continue
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{field}: {message}" if field else message)
    return "; ".join(parts)


def _merge(data: Mapping[str, Any], presets: dict[str, Preset]) -> list[str]:
    """Add the presets of one file to `presets`; return the problems found."""
    problems = []
    for name, fields in data.items():
        where = f"preset {name!r}"
        if not isinstance(fields, dict):
            problems.append(f"{where} must be a table of fields (fit, width, height, format, ...), got {fields!r}")
            continue
        fields = dict(fields)
        if "name" in fields:
            problems.append(f"{where}: remove the 'name' field; the table's key is the preset's name")
            continue
        base = fields.pop("extends", None)
        if base is not None:
            if not isinstance(base, str):
                problems.append(f"{where}: extends names one preset, e.g. extends = \"web\"; got {base!r} (to combine "
                                f"presets, extend one and set the other fields yourself)")
                continue
            if base not in presets:
                problems.append(f"{where}: extends unknown preset {base!r}; known: {', '.join(sorted(presets))}")
                continue
            inherited = presets[base].model_dump(exclude={"name", "extension"} if "format" in fields else {"name"})
            for key in _NOT_FOR_FIT.get(fields.get("fit", presets[base].fit), ()):
                inherited.pop(key, None)  # sizing the new fit does not use: the user cannot "remove" an inherited field
            changed = ", ".join(f"{k}={v}" for k, v in fields.items() if k != "description")
            inherited["description"] = f"{base} with {changed}" if changed else presets[base].description
            fields = {**inherited, **fields}
        try:
            presets[name] = Preset(name=name, **fields)
        except ValidationError as exc:
            problems.append(f"{where}: {_validation_problems(exc).replace(f'{where}: ', '')}")
    return problems


def _shipped() -> dict[str, Preset]:
    presets: dict[str, Preset] = {}
    source = resources.files(__package__).joinpath("presets.toml")
    problems = _merge(tomllib.loads(source.read_text(encoding="utf-8")), presets)
    assert not problems, problems  # the shipped file is tested
    return presets


PRESETS: dict[str, Preset] = _shipped()


def load_presets(path: str | Path | None = None) -> dict[str, Preset]:
    """The shipped presets plus those of a user's TOML/YAML file (which may replace shipped ones)."""
    presets = dict(PRESETS)
    if path is None:
        return presets
    path = Path(path)
    problems = _merge(_read_mapping(path), presets)
    if problems:
        raise PresetError("\n".join([f"Presets file {path} has problems:", *(f"  - {p}" for p in problems)]))
    return presets


def _unknown(names: list[str], known: list[str]) -> UnknownPresetError:
    """One error naming every unknown preset, a close match for each, and the known ones."""
    named = []
    for name in names:
        hint = difflib.get_close_matches(name, known, n=1)
        named.append(f"{name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return UnknownPresetError(
        f"unknown preset{'s' if len(names) > 1 else ''} {', '.join(named)}; known presets: {', '.join(known)}. "
        "`zimage-batch presets` lists them with their rules; --presets-file adds your own."
    )


def get_preset(name: str, presets: Mapping[str, Preset] | None = None) -> Preset:
    """The preset called `name`; UnknownPresetError names it, a close match and the known ones."""
    presets = PRESETS if presets is None else presets
    if name not in presets:
        raise _unknown([name], sorted(presets))
    return presets[name]


def unsupported(presets: Iterable[Preset]) -> list[str]:
    """Presets whose format this Pillow cannot encode (AVIF is built in from Pillow 11.3, WebP needs
    libwebp), each as a problem with its fix; checked before any model loads or image is read."""
    import warnings

    import PIL
    from PIL import features

    problems = []
    for preset in presets:
        if preset.format not in ("AVIF", "WEBP"):
            continue
        with warnings.catch_warnings():  # an older Pillow does not know the feature "avif": it warns, says False
            warnings.simplefilter("ignore")
            available = features.check(preset.format.lower())
        if not available:
            problems.append(f"preset {preset.name!r} writes {preset.format}, which this Pillow ({PIL.__version__}) cannot "
                            f"encode: install one that can (pip install -U 'Pillow>=11.3'), or use another preset "
                            f"(e.g. web or web_webp)")
    return problems


def select_presets(names: list[str], presets: Mapping[str, Preset]) -> list[Preset]:
    """The named presets in order (a repeated name once); UnknownPresetError naming every unknown one."""
    unknown = [name for name in dict.fromkeys(names) if name not in presets]
    if unknown:
        raise _unknown(unknown, sorted(presets))
    return [presets[name] for name in dict.fromkeys(names)]


def format_bytes(count: int | None) -> str:
    """'10 MB', '500 KB' or '1234 B'; '-' for None."""
    if count is None:
        return "-"
    for unit in ("GB", "MB", "KB"):
        if count >= _UNITS[unit] and count % (_UNITS[unit] // 10) == 0:
            return f"{count / _UNITS[unit]:g} {unit}"
    return f"{count} B"


def _row(p: Preset) -> list[str]:
    size = f"{p.width}x{p.height}" if p.fit != "long_side" else f"long side {p.long_side}" if p.long_side else "original"
    fit = {"pad": "pad on white", "cover": "crop to subject", "long_side": "resize"}[p.fit]
    background = f"white, shadow {'kept' if p.shadow == 'keep' else 'removed'}" if p.white else "kept"
    bounds = p.fill_bounds()
    fill = f"{p.fill:.0%}" if p.fill is not None else ""
    if bounds:
        fill = f"{fill} ({bounds[0]:.0%}-{bounds[1]:.0%})".strip()
    encoding = p.format if p.format == "PNG" else f"{p.format} q{p.quality}"
    return [p.name, size, fit, background, fill or "-", encoding, format_bytes(p.max_bytes), p.description]


def presets_table(presets: Mapping[str, Preset], *, markdown: bool = False) -> str:
    """The presets and their rules as an aligned text table, or a Markdown table."""
    header = ["preset", "size", "fit", "background", "fill", "format", "max file", "description"]
    rows = [header] + [_row(p) for p in presets.values()]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "---|" * len(header))
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)
