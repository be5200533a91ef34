"""Prompt templates: optional YAML front matter (generation defaults) + a Jinja2 prompt body.

    ---
    size: 1024x1024
    steps: 8
    presets: [amazon_main, web]
    background: white
    ---
    {{ title }}, {{ color }} {{ material }}, product photo on a pure white background

Bodies render in a sandboxed environment with strict undefined variables. Catalog values
are passed as data: a value that looks like ``{{ 7*7 }}`` stays that text. CSV values are text, never
converted (a sku ``00123`` keeps its zeros): ``{{ price * 2 }}`` would repeat the text, so planning
refuses a template that uses a text column as a number (``NumberUse``) and names the fix,
``{{ price | float * 2 }}``. The rendered
prompt has its whitespace collapsed (none kept between two CJK characters), so a template
can be laid out over several lines.
Besides the catalog's columns a template sees ``row`` (all values of the row, for column
names that are not identifiers), ``variant`` (0, 1, ...) and the keys of the variant's
mapping when ``variants`` is a list. A template is one file: ``{% include %}``, ``{% import %}``,
``{% from %}`` and ``{% extends %}`` are refused when it is loaded (a macro in the same file shares text).
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.meta
import yaml
from jinja2 import nodes
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import TemplateError

BUILTIN_NAMES = frozenset({"row", "variant"})
_ARITHMETIC = {nodes.Mul: "*", nodes.Div: "/", nodes.FloorDiv: "//", nodes.Sub: "-", nodes.Pow: "**", nodes.Mod: "%",
               nodes.Add: "+"}
_COMPARISONS = {"eq": "==", "ne": "!=", "gt": ">", "gteq": ">=", "lt": "<", "lteq": "<="}
_OTHER_FILES = {nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "from", nodes.Extends: "extends"}

_ENV = SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
_CJK = "\u3000-\u303f\u3400-\u9fff\uff00-\uffef"
_SPACE_BETWEEN_CJK = re.compile(f"(?<=[{_CJK}]) (?=[{_CJK}])")


def collapse_whitespace(text: str) -> str:
    """Fold line breaks and runs of spaces into one space; none between two CJK characters."""
    return _SPACE_BETWEEN_CJK.sub("", " ".join(text.split()))


class TemplateSettings(BaseModel):
    """The front matter: generation defaults for every job of the template."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    size: str = "1024x1024"
    steps: int = Field(8, ge=1, le=100, strict=True)  # strict: YAML's `true` is not 1 step
    guidance_scale: float = Field(0.0, ge=0.0, le=30.0)
    negative_prompt: str = ""
    variants: int | list[dict[str, Any]] = 1
    presets: list[str] = Field(default_factory=lambda: ["web"])
    background: Literal["white", "scene"] = "scene"
    max_sequence_length: int = Field(512, ge=16, le=1024)

    @field_validator("size", mode="before")
    @classmethod
    def _size_is_text(cls, value: Any) -> Any:
        if isinstance(value, (int, float)):  # YAML reads 1024 as a number, and 0x400 as hexadecimal
            raise ValueError(f"YAML read it as the number {value!r}; write both sides, e.g. size: 1024x1024")
        return value

    @field_validator("variants")
    @classmethod
    def _variants(cls, value: int | list[dict[str, Any]]) -> int | list[dict[str, Any]]:
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError("must be between 1 and 64")
        if isinstance(value, list) and not value:
            raise ValueError("must not be an empty list")
        return value

    @field_validator("presets")
    @classmethod
    def _presets(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one preset")
        return value

    def variant_contexts(self) -> list[dict[str, Any]]:
        """One extra context per variant."""
        if isinstance(self.variants, int):
            return [{} for _ in range(self.variants)]
        return [dict(v) for v in self.variants]

    def dimensions(self) -> tuple[int, int]:
        """(width, height) parsed from ``size``; raises ValueError with the reason."""
        return parse_size(self.size)


def parse_size(size: str) -> tuple[int, int]:
    """Parse ``WIDTHxHEIGHT``; both must be multiples of 16 between 256 and 2048 (one error names every problem)."""
    parts = str(size).lower().replace("×", "x").split("x")
    if len(parts) == 1 and parts[0].strip().isdigit():
        side = parts[0].strip()
        raise ValueError(f"size {size!r} is one number: give both sides, WIDTHxHEIGHT, e.g. {side}x{side} for a square")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"size {size!r} is not WIDTHxHEIGHT, e.g. 1024x1024")
    width, height = (int(p) for p in parts)
    problems = []
    for name, value in (("width", width), ("height", height)):
        if not 256 <= value <= 2048:
            problems.append(f"{name} {value} is outside 256..2048")
        elif value % 16:
            lower = value // 16 * 16
            problems.append(f"{name} {value} is not a multiple of 16 (use {lower} or {lower + 16})")
    if problems:
        why = ", as the model works on 16-pixel patches" if any("multiple" in p for p in problems) else ""
        raise ValueError(f"size {size}: {', and '.join(problems)}{why}")
    return width, height


@dataclass(frozen=True)
class NumberUse:
    """Values used as numbers in a template (``price * 2``, ``stock > 0``): ``columns`` names the catalog
    columns (a bare name, ``row.x`` or ``row['x']``), ``expression`` is the expression as written (roughly),
    ``fixed`` the same with ``| float`` after each column, and ``at`` where it is (``line 5``)."""

    columns: tuple[str, ...]
    expression: str
    fixed: str
    at: str


@dataclass(frozen=True)
class Template:
    """A loaded template: its name (file stem), settings, compiled body and content hash."""

    name: str
    path: str
    sha256: str
    settings: TemplateSettings
    variables: frozenset[str]
    _body: jinja2.Template
    _negative: jinja2.Template | str  # a plain string when it has no Jinja tags
    optional: frozenset[str] = frozenset()  # variables the template guards (is defined, | default)
    number_uses: tuple[NumberUse, ...] = ()  # values used as numbers: wrong when the catalog's values are text

    @cached_property
    def dimensions(self) -> tuple[int, int]:
        """(width, height); raises ValueError for a bad size."""
        return self.settings.dimensions()

    @cached_property
    def variant_count(self) -> int:
        return len(self._variants)

    @cached_property
    def presets(self) -> tuple[str, ...]:
        return tuple(self.settings.presets)

    @cached_property
    def _variants(self) -> list[dict[str, Any]]:
        return self.settings.variant_contexts()

    def required_columns(self) -> set[str]:
        """Catalog columns the body needs (names not given by the template itself, nor optional:
        tested with ``is defined`` or given a ``default``)."""
        provided = set(BUILTIN_NAMES) | self.optional
        for ctx in self.settings.variant_contexts():
            provided |= set(ctx)
        return set(self.variables) - provided

    def render(self, values: dict[str, Any], variant: int) -> tuple[str, str]:
        """Render (prompt, negative_prompt) for one row and variant; raises jinja2 errors."""
        context = {**_ENV.globals, **values, **self._variants[variant], "row": values, "variant": variant}
        prompt = collapse_whitespace(_render(self._body, context))
        negative = self._negative if isinstance(self._negative, str) else collapse_whitespace(_render(self._negative, context))
        return prompt, negative


def _render(template: jinja2.Template, context: dict[str, Any]) -> str:
    """``template.render(context)`` without copying the context (a third of planning time, measured)."""
    return _ENV.concat(template.root_render_func(template.new_context(context, shared=True)))


def _split_front_matter(text: str) -> tuple[str, str, int]:
    """Return (yaml text, body, line number where the body starts)."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        return "", text, 1
    for i, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            return "".join(lines[1:i]), "".join(lines[i + 1 :]), i + 2
    raise ValueError("the front matter opened with '---' on line 1 is never closed by a '---' line")


def _optional(parsed: nodes.Template) -> frozenset[str]:
    """Names the template itself guards: ``x is defined`` / ``is undefined``, or ``x | default(...)``.
    A catalog without such a column is fine; a row without the value renders the guarded branch."""
    tested = [node.node for node in parsed.find_all(nodes.Test) if node.name in ("defined", "undefined")]
    defaulted = [node.node for node in parsed.find_all(nodes.Filter) if node.name in ("default", "d")]
    return frozenset(node.name for node in tested + defaulted if isinstance(node, nodes.Name))


def _column(node: nodes.Node, undeclared: set[str]) -> tuple[str, str] | None:
    """(column, how it is written) for a bare catalog value: a name the template does not set, ``row.x``
    or ``row['x']``; None for anything else (a filter such as ``price | float``, a constant, ...)."""
    if isinstance(node, nodes.Name) and node.name in undeclared and node.name not in BUILTIN_NAMES:
        return node.name, node.name
    if isinstance(node, nodes.Getattr) and isinstance(node.node, nodes.Name) and node.node.name == "row":
        return node.attr, f"row.{node.attr}"
    if (isinstance(node, nodes.Getitem) and isinstance(node.node, nodes.Name) and node.node.name == "row"
            and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str)):
        return node.arg.value, f"row[{node.arg.value!r}]"
    return None


def _is_number(node: nodes.Node) -> bool:
    return isinstance(node, nodes.Const) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool)


def _number_uses(parsed: nodes.Template, at) -> list[NumberUse]:
    """Catalog values the template uses as numbers: arithmetic on them (``price * 2``: a text value is
    repeated, ``'24.90' * 2`` is ``'24.9024.90'``, or the row fails) and comparisons with a number or
    ordering (``stock == 0`` is never true for the text ``'0'``; ``'9' > '10'``). ``text + text`` and a
    comparison with a text constant are what text does, and not listed. ``at(lineno)`` names the place."""
    # A name the template binds anywhere ({% set %}, a for target, a macro's or call block's argument,
    # {% with %}) may hold a converted value where it is used: `{% set price = price | float %}` is the fix
    # itself. Without tracking scopes, such names are left out.
    bound = {node.name for node in parsed.find_all(nodes.Name) if node.ctx in ("store", "param")}
    undeclared = jinja2.meta.find_undeclared_variables(parsed) - bound
    found: list[NumberUse] = []

    def shown(node: nodes.Node, fix: bool) -> str:
        column = _column(node, undeclared)
        if column is not None:
            return f"{column[1]} | float" if fix else column[1]
        return repr(node.value) if isinstance(node, nodes.Const) else "..."

    def add(columns: list[tuple[str, str] | None], left: nodes.Node, op: str, right: nodes.Node, lineno: int) -> None:
        named = tuple(dict.fromkeys(c[0] for c in columns if c))
        if named:
            found.append(NumberUse(named, f"{shown(left, False)} {op} {shown(right, False)}",
                                   f"{shown(left, True)} {op} {shown(right, True)}", at(lineno)))

    for node in parsed.find_all(tuple(_ARITHMETIC)):
        op = _ARITHMETIC[type(node)]
        left, right = _column(node.left, undeclared), _column(node.right, undeclared)
        if isinstance(node, nodes.Add):  # text + text joins text (as ~ does); text + a number fails on every row
            add([left if _is_number(node.right) else None, right if _is_number(node.left) else None],
                node.left, op, node.right, node.lineno)
        elif isinstance(node, nodes.Mod):  # '%s' % price formats text; price % 2 does no arithmetic
            add([left], node.left, op, node.right, node.lineno)
        else:
            add([left, right], node.left, op, node.right, node.lineno)
    for node in parsed.find_all(nodes.Compare):
        left = node.expr
        for operand in node.ops:
            op, right = _COMPARISONS.get(operand.op), operand.expr
            if op is not None:  # a column against a number, or ordered against anything but a text constant
                columns = [_column(left, undeclared), _column(right, undeclared)]
                other = right if columns[0] else left
                text = isinstance(other, nodes.Const) and isinstance(other.value, str)
                if _is_number(other) or (op not in ("==", "!=") and not text):
                    add(columns, left, op, right, node.lineno)
            left = right
    return found


def _syntax_error(where: str, at: str, exc: jinja2.TemplateSyntaxError) -> TemplateError:
    return TemplateError(f"Template {where}, {at}: Jinja syntax error: {(exc.message or '').rstrip('.')}. "
                         f"Check the {{{{ }}}} and {{% %}} tags near that line.")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line, with the file's line number (the front matter starts on line 2)."""
    mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
    words = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    what = ", ".join(w for w in words if w) or str(exc).splitlines()[0]
    return (f", line {mark.line + 2}" if mark else "") + f": bad front matter: {what}"


def _front_matter_line(front: str, key: str) -> int | None:
    """The file line of a top-level front-matter key, or None."""
    for number, line in enumerate(front.splitlines(), start=2):
        if line.startswith(f"{key}:"):
            return number
    return None


def _front_matter_problems(exc: ValidationError, data: dict[str, Any]) -> list[str]:
    """Every front-matter problem: pydantic's, a close match for an unknown key, and a bad size (which is
    otherwise checked only once the rest is valid), so one message names them all."""
    problems = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(field, TemplateSettings.model_fields, n=1)
            problems.append(f"{field}: unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        else:
            problems.append(f"{field or 'front matter'}: {error['msg'].removeprefix('Value error, ')}")
    if isinstance(data.get("size"), str) and not any(error["loc"][:1] == ("size",) for error in exc.errors()):
        try:
            parse_size(data["size"])
        except ValueError as size_problem:
            problems.append(str(size_problem))
    return problems


def load_template(path: str | Path) -> Template:
    """Load and compile a template file; raises TemplateError naming the file and the fix."""
    path = Path(path)
    where = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TemplateError(f"Template {where} does not exist. Check the path, or list templates/ for the ones shipped.") from None
    except OSError as exc:
        raise TemplateError(f"Template {where} cannot be read: {exc.strerror}.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise TemplateError(f"Template {where} is not UTF-8 text. Save it as UTF-8.") from None
    try:
        front, body, body_line = _split_front_matter(text)
        data = yaml.safe_load(front) if front.strip() else {}
    except ValueError as exc:
        raise TemplateError(f"Template {where}: bad front matter: {exc}. It must be a YAML mapping between two '---' lines.") from None
    except yaml.YAMLError as exc:
        raise TemplateError(f"Template {where}{_yaml_problem(exc)}. It must be a YAML mapping between two '---' lines.") from None
    if not isinstance(data, dict):
        raise TemplateError(f"Template {where}: the front matter must be a YAML mapping (key: value lines), got {type(data).__name__}.")
    try:
        settings = TemplateSettings(**data)
    except ValidationError as exc:
        known = ", ".join(TemplateSettings.model_fields)
        problems = "; ".join(_front_matter_problems(exc, data))
        raise TemplateError(f"Template {where}: invalid front matter ({problems}). Known keys: {known}.") from None
    if not body.strip():
        raise TemplateError(f"Template {where} has no prompt body after its front matter.")
    try:
        parsed = _ENV.parse(body)
        compiled = _ENV.from_string(body)
    except jinja2.TemplateSyntaxError as exc:
        raise _syntax_error(where, f"line {(exc.lineno or 1) + body_line - 1}", exc) from None
    negative_line = _front_matter_line(front, "negative_prompt")
    negative_at = f"line {negative_line} (negative_prompt)" if negative_line else "negative_prompt"
    try:
        parsed_negative = _ENV.parse(settings.negative_prompt)
        negative_has_tags = any(tag in settings.negative_prompt for tag in ("{{", "{%", "{#"))
        negative = _ENV.from_string(settings.negative_prompt) if negative_has_tags else collapse_whitespace(settings.negative_prompt)
    except jinja2.TemplateSyntaxError as exc:
        raise _syntax_error(where, negative_at, exc) from None
    other_files = [(f"line {node.lineno + body_line - 1}", node) for node in parsed.find_all(tuple(_OTHER_FILES))]
    other_files += [(negative_at, node) for node in parsed_negative.find_all(tuple(_OTHER_FILES))]
    if other_files:
        at, node = other_files[0]
        raise TemplateError(
            f"Template {where}, {at}: {{% {_OTHER_FILES[type(node)]} %}} is not supported: a template is one file, "
            f"and no other file is read. Paste the shared text into this template, or define it as a macro in this "
            f"file ({{% macro name() %}}...{{% endmacro %}})."
        )
    variables = jinja2.meta.find_undeclared_variables(parsed) | jinja2.meta.find_undeclared_variables(parsed_negative)
    number_uses = (_number_uses(parsed, lambda lineno: f"line {lineno + body_line - 1}")
                   + _number_uses(parsed_negative, lambda lineno: negative_at))
    return Template(
        name=path.stem,
        path=where,
        sha256=hashlib.sha256(raw).hexdigest(),
        settings=settings,
        variables=frozenset(variables),
        optional=_optional(parsed) | _optional(parsed_negative),
        number_uses=tuple(number_uses),
        _body=compiled,
        _negative=negative,
    )
