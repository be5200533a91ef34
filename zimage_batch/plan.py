"""Planning: catalog rows x templates x variants -> jobs. Pure: no I/O beyond reading inputs, no torch.

A job id is a content hash of everything that determines the generated image (prompt,
negative prompt, seed, size, steps, guidance, sequence length, model identity), so a rerun
finds finished work by id and a changed prompt is new work. Seeds are derived from
(sku, template name, variant) unless the catalog has a ``seed`` column (a whole number; ``11.0``,
how pandas writes an int column with a gap, reads as 11).

A catalog column that a template's own names would hide (``row``, ``variant``, a key of its
``variants`` mappings) is refused by ``check_inputs`` when the template uses that name.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import jinja2
from pydantic import TypeAdapter

from .catalog import Catalog, Row, RowProblem, expand_sources, row_place, shown, sku_label
from .errors import CatalogError, PlanError, TemplateError
from .models import resolve_model
from .presets import unsupported
from .templates import BUILTIN_NAMES, Template, load_template, parse_size

SEED_COLUMN = "seed"
_WHOLE_NUMBER = re.compile(r"(\d+)(?:\.0+)?")  # 11, or 11.0 as pandas writes an int column with a gap
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # control characters whitespace folding leaves


@dataclass(frozen=True, slots=True)
class Job:
    """One image to generate, with everything needed to reproduce it.

    A slotted dataclass rather than a pydantic model: planning makes millions of these and
    construction cost matters (measured: 9 us per ``model_construct`` vs ~1 us). JSON goes
    through a pydantic TypeAdapter (``to_json`` / ``from_json``), which validates on the way in.
    """

    job_id: str
    sku: str
    catalog: str
    row: int
    template: str
    template_path: str
    template_sha256: str
    variant: int
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    max_sequence_length: int
    model: str
    presets: tuple[str, ...]
    background: str

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one pipeline call."""
        return (self.width, self.height, self.steps, self.guidance_scale, self.max_sequence_length)

    def to_json(self) -> str:
        return _JOB_JSON.dump_json(self).decode("utf-8")

    @staticmethod
    def from_json(text: str) -> Job:
        return _JOB_JSON.validate_json(text)

    def to_dict(self) -> dict:
        return _JOB_JSON.dump_python(self)


_JOB_JSON = TypeAdapter(Job)


def derive_seed(*parts: object) -> int:
    """A stable 32-bit seed from the given parts."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big")


def compute_job_id(sku: str, template: str, variant: int, prompt: str, negative_prompt: str, seed: int, width: int,
                   height: int, steps: int, guidance_scale: float, max_sequence_length: int, model: str,
                   background: str, presets: tuple[str, ...]) -> str:
    """Content hash of which image this is (sku, template, variant) and of everything that determines
    it and its delivered files: two rows that render the same prompt with the same seed are still two
    jobs, and a template whose presets or background change is new work, its old record kept."""
    canonical = json.dumps(
        [sku, template, variant, prompt, negative_prompt, seed, width, height, steps, float(guidance_scale),
         max_sequence_length, model, background, list(presets)],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]


@dataclass(frozen=True)
class PlanInputs:
    """Validated catalogs and templates, ready to expand into jobs."""

    catalogs: list[Catalog]
    templates: list[Template]
    model: str  # the model identity that goes into job ids
    size: tuple[int, int] | None = None  # --size: overrides every template's size
    steps: int | None = None  # --steps: overrides every template's steps

    def notes(self) -> list[str]:
        """Settings that work but that Z-Image-Turbo was not made for (the article's FAQ: black or poor
        images "大概率是参数设置不当"); empty for other models."""
        if "turbo" not in self.model.lower():
            return []
        found = []
        few_steps = "Z-Image-Turbo is distilled for 8 (8-9 are fine): fewer give soft, unfinished or dark images."
        if self.steps is not None and self.steps < 6:  # the command line's value, for every template
            found.append(f"--steps {self.steps} (given on the command line, for every template): {few_steps}")
        for template in self.templates:
            steps, guidance = template.settings.steps, template.settings.guidance_scale
            if self.steps is None and steps < 6:
                found.append(f"{template.path}: {steps} step(s) (its front matter's steps); {few_steps}")
            if guidance > 1.0:
                found.append(f"{template.path}: guidance_scale {guidance}; Z-Image-Turbo is made for 0.0: more costs a "
                             f"second forward per step and tends to burn colours and text.")
        return found


def check_inputs(catalogs: Sequence[str], templates: Sequence[str], model: str, known_presets: Iterable[str],
                 *, size: str | None = None, steps: int | None = None) -> PlanInputs:
    """Open every catalog and template and check they fit together; raise PlanError listing every problem."""
    problems: list[str] = []
    size_override = None
    if size is not None:
        try:
            size_override = parse_size(size)
        except ValueError as exc:
            problems.append(f"--size: {exc}.")
    if steps is not None and not 1 <= steps <= 100:
        problems.append(f"--steps {steps}: must be between 1 and 100 (Z-Image-Turbo is made for 8).")
    opened: list[Catalog] = []
    loaded: list[Template] = []
    if not catalogs:
        problems.append("No catalog given. Pass one or more CSV or Parquet files.")
    if not templates:
        problems.append("No template given. Pass --template templates/product_white.j2 (several allowed).")
    paths, pattern_problems = expand_sources(catalogs)
    problems.extend(pattern_problems)
    for path in paths:
        try:
            opened.append(Catalog(path))
        except CatalogError as exc:
            problems.append(str(exc))
    for path in templates:
        try:
            loaded.append(load_template(path))
        except TemplateError as exc:
            problems.append(str(exc))
    names: dict[str, str] = {}
    known = sorted(known_presets)
    for template in loaded:
        if template.name in names:
            problems.append(f"Templates {names[template.name]} and {template.path} have the same name {template.name!r}; output folders are named after it. Rename one.")
        names.setdefault(template.name, template.path)
        try:
            template.settings.dimensions()
        except ValueError as exc:
            if size_override is None:
                problems.append(f"Template {template.path}: {exc}.")
        if isinstance(known_presets, Mapping):
            usable = [known_presets[name] for name in template.settings.presets if name in known_presets]
            problems.extend(f"Template {template.path}: {problem}." for problem in unsupported(usable))
        for preset in template.settings.presets:
            if preset not in known:
                hint = difflib.get_close_matches(preset, known, n=1)
                problems.append(
                    f"Template {template.path}: unknown preset {preset!r}"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f". Known presets: {', '.join(known)}."
                )
        for catalog in opened:
            problems.extend(_hidden_columns(catalog, template))
            problems.extend(_text_used_as_number(catalog, template))
            not_text = template.required_columns() & set(catalog.not_text)
            if not_text:
                problems.append(f"Template {template.path} uses {', '.join(sorted(not_text))}. " + catalog.not_text_problem(not_text))
            for column in sorted(template.required_columns() - set(catalog.columns)):
                hint = difflib.get_close_matches(column, catalog.columns, n=1)
                problems.append(
                    f"Template {template.path} uses {{{{ {column} }}}}, but catalog {catalog.name} has no "
                    f"column {column!r}"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f". Its columns: {shown(catalog.columns)}. Add the column or change the template."
                )
    try:
        identity = resolve_model(model).identity
    except Exception as exc:  # ModelError: report with the rest
        problems.append(str(exc))
        identity = model
    if problems:
        raise PlanError(problems)
    return PlanInputs(opened, loaded, identity, size_override, steps)


def _hidden_columns(catalog: Catalog, template: Template) -> list[str]:
    """Catalog columns the template cannot see: it uses the name, but for its own ``row``, ``variant``
    or a key of its ``variants`` mappings, so the column's values would never reach a prompt."""
    found = []
    for column in sorted(set(catalog.columns) & set(template.variables)):
        if column in BUILTIN_NAMES:
            meaning = "the row's values (all columns)" if column == "row" else "the variant number (0, 1, ...)"
            new_name = "size_variant" if column == "variant" else "row_label"
            fix = f"Rename the column (e.g. to {new_name!r}) and use that name in the template"
        elif any(column in mapping for mapping in template.settings.variant_contexts()):
            meaning = "the value its 'variants:' list sets for each variant"
            fix = (f"Rename the key in the template's 'variants:' (e.g. to 'shot_{column}'), or rename the column, "
                   f"so each name means one thing")
        else:
            continue
        found.append(f"Catalog {catalog.name} has a column {column!r}, but in template {template.path} "
                     f"{{{{ {column} }}}} means {meaning}, not this column. {fix}.")
    return found


def _text_used_as_number(catalog: Catalog, template: Template) -> list[str]:
    """Template expressions that use a column of text as a number (``price * 2``, ``stock > 0``). CSV values
    are text and are never converted (a sku ``00123`` keeps its zeros), so ``'24.90' * 2`` renders
    ``24.9024.90``, ``'0' == 0`` is false and ``'9' > '10'``: wrong prompts, silently, or a failure on every row."""
    own = {key for mapping in template.settings.variant_contexts() for key in mapping}
    found = []
    for use in template.number_uses:
        text = [c for c in use.columns if c in catalog.text_columns and c not in own]
        if not text:
            continue
        kind = ("CSV values are text, never converted to numbers (a sku 00123 keeps its zeros)"
                if catalog.format == "csv" else "the Parquet file stores that column as text (strings)")
        found.append(
            f"Template {template.path}, {use.at}: `{use.expression}` uses column {shown(text)} of catalog "
            f"{catalog.name} as a number, but {kind}. On text, arithmetic repeats or joins it ('24.90' * 2 gives "
            f"'24.9024.90') and comparisons compare text ('0' == 0 is false), or the row fails. Convert the value "
            f"in the template: `{use.fixed}` (or `| int` for whole numbers)."
        )
    return found


def plan_jobs(inputs: PlanInputs) -> Iterator[Job | RowProblem]:
    """Expand rows x templates x variants into jobs, streaming; bad rows come out as RowProblems."""
    first_seen: dict[str, tuple[str, int, int | None]] = {}
    for catalog in inputs.catalogs:
        for item in catalog.rows():
            if isinstance(item, RowProblem):
                yield item
                continue
            sku = item.sku
            if sku in first_seen:
                where = first_seen[sku]
                yield RowProblem(item.catalog, item.row, f"this sku already appeared in {where[0]}, "
                                 f"{row_place(where[1], where[2])}; skus must be unique.", sku, item.line)
                continue
            first_seen[sku] = (item.catalog, item.row, item.line)
            yield from _row_jobs(item, inputs)


def _row_jobs(row: Row, inputs: PlanInputs) -> Iterator[Job | RowProblem]:
    base_seed = None
    if SEED_COLUMN in row.values:
        whole = _WHOLE_NUMBER.fullmatch(str(row.values[SEED_COLUMN]).strip())
        base_seed = int(whole[1]) if whole else None
        if base_seed is None or not 0 <= base_seed < 2**32:
            yield RowProblem(row.catalog, row.row, f"column 'seed' is {row.values[SEED_COLUMN]!r}; it must be a whole number from 0 to 4294967295, or empty.", row.sku, row.line)
            return
    for template in inputs.templates:
        settings = template.settings
        width, height = inputs.size or template.dimensions
        steps = inputs.steps or settings.steps
        for variant in range(template.variant_count):
            try:
                prompt, negative = template.render(row.values, variant)
            except jinja2.UndefinedError as exc:
                yield RowProblem(row.catalog, row.row, _undefined_message(exc, template), row.sku, row.line)
                break
            except Exception as exc:  # sandbox SecurityError, a filter's TypeError, ...
                yield RowProblem(row.catalog, row.row, f"template {template.path} failed to render: {type(exc).__name__}: {exc}.", row.sku, row.line)
                break
            if not prompt:
                yield RowProblem(row.catalog, row.row, f"template {template.path} rendered an empty prompt for this row.", row.sku, row.line)
                break
            control = _CONTROL.search(prompt + negative)
            if control:
                yield RowProblem(row.catalog, row.row, f"the prompt from template {template.path} holds the invisible control "
                                 f"character U+{ord(control[0]):04X}, which the images' embedded metadata cannot carry. "
                                 f"Remove it from this row's values.", row.sku, row.line)
                break
            seed = (base_seed + variant) % 2**32 if base_seed is not None else derive_seed(row.sku, template.name, variant)
            job_id = compute_job_id(row.sku, template.name, variant, prompt, negative, seed, width, height, steps,
                                    settings.guidance_scale, settings.max_sequence_length, inputs.model,
                                    settings.background, template.presets)
            yield Job(
                job_id=job_id, sku=row.sku, catalog=row.catalog, row=row.row, template=template.name,
                template_path=template.path, template_sha256=template.sha256, variant=variant, prompt=prompt,
                negative_prompt=negative, seed=seed, width=width, height=height, steps=steps,
                guidance_scale=settings.guidance_scale, max_sequence_length=settings.max_sequence_length,
                model=inputs.model, presets=template.presets, background=settings.background,
            )


def _undefined_message(exc: jinja2.UndefinedError, template: Template) -> str:
    message = str(exc.message or exc)
    attribute = re.search(r"has no attribute '([^']*)'", message)
    if attribute:  # {{ row.nosuch }}: jinja says "'dict object' has no attribute 'nosuch'"
        return (f"template {template.path} asks for .{attribute[1]} of a value that has no such attribute or key in "
                f"this row ({message}). If it is a column, check its name against the catalog's columns; else fix the "
                f"template's expression.")
    name = message.split("'")[1] if "'" in message else message
    return (
        f"column {name!r} is empty in this row, but template {template.path} uses it. Fill it in, or guard "
        f"it in the template with {{% if {name} is defined %}}...{{% endif %}}."
    )


class RowProblems:
    """The row problems of a planning pass, for people: one line per (catalog, message), with its rows.

    A template that fails on every row (``{{ 1/0 }}``, a sandbox violation) or a column empty in
    thousands of rows is one line naming where they are ("lines 2-301 (300 rows; skus S0, S1, S2,
    ...)" for CSV, by the file's lines; "rows 1-300 ..." for Parquet), not 300 near-copies. A range is
    a run of consecutive data rows, shown from the line the first starts on to the line the last
    starts on. Memory stays bounded: at most ``limit`` distinct lines, ``MAX_RANGES`` row ranges and
    ``MAX_SKUS`` skus per line are kept; ``count`` counts every problem."""

    MAX_RANGES = 12
    MAX_SKUS = 3

    def __init__(self, limit: int = 1000):
        self.limit = limit
        self.count = 0
        self._rows: dict[tuple[str, str], _Problems] = {}  # (catalog, message) -> where the problem is

    def add(self, problem: RowProblem) -> None:
        self.count += 1
        key = (problem.catalog, problem.message)
        entry = self._rows.get(key)
        if entry is None:
            if len(self._rows) >= self.limit:
                return
            entry = self._rows[key] = _Problems()
        entry.count += 1
        if problem.sku and len(entry.skus) < self.MAX_SKUS:
            entry.skus.append(problem.sku)
        ranges = entry.ranges
        if ranges and problem.row in (ranges[-1][1], ranges[-1][1] + 1):
            ranges[-1][1], ranges[-1][3] = problem.row, problem.line
        elif len(ranges) < self.MAX_RANGES:
            ranges.append([problem.row, problem.row, problem.line, problem.line])

    def listed(self) -> list[str]:
        """One line per distinct problem, in the order first seen."""
        lines = []
        for (catalog, message), entry in self._rows.items():
            first_row, _, first_line, _ = entry.ranges[0]
            if entry.count == 1:
                lines.append(str(RowProblem(catalog, first_row, message, entry.skus[0] if entry.skus else "", first_line)))
                continue
            by_line = first_line is not None  # CSV: the file's lines; Parquet: data rows
            spans = [(a, b) if not by_line else (c, d) for a, b, c, d in entry.ranges]
            shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
            if sum(b - a + 1 for a, b, _, _ in entry.ranges) < entry.count:
                shown += ", ..."
            skus = ""
            if entry.skus:
                more = ", ..." if entry.count > len(entry.skus) else ""
                skus = f"; skus {', '.join(sku_label(sku) for sku in entry.skus)}{more}"
            lines.append(f"{catalog}, {'lines' if by_line else 'rows'} {shown} ({entry.count} rows{skus}): {message}")
        return lines


@dataclass(slots=True)
class _Problems:
    """Where one distinct row problem is: its count, its first skus, and ranges of consecutive data rows
    as [first row, last row, first row's line, last row's line] (lines None for Parquet)."""

    count: int = 0
    skus: list[str] = field(default_factory=list)
    ranges: list[list] = field(default_factory=list)


@dataclass
class PlanSummary:
    """Counts of a planning pass."""

    rows: int = 0
    jobs: int = 0
    problems: list[str] | None = None
    problem_count: int = 0


def summarize(items: Iterable[Job | RowProblem], on_job=None) -> PlanSummary:
    """Consume a plan, counting jobs and rows and collecting problems; ``on_job`` sees each job."""
    summary = PlanSummary()
    problems = RowProblems()
    last_row = None
    for item in items:
        if isinstance(item, RowProblem):
            problems.add(item)
            continue
        summary.jobs += 1
        if (item.catalog, item.row) != last_row:  # a row's jobs come out together
            summary.rows += 1
            last_row = (item.catalog, item.row)
        if on_job is not None:
            on_job(item)
    summary.problems, summary.problem_count = problems.listed(), problems.count
    return summary


def strict_check(inputs: PlanInputs) -> PlanSummary:
    """A full planning pass that raises PlanError if any row has a problem (``--strict``)."""
    summary = summarize(plan_jobs(inputs))
    if summary.problems:
        raise PlanError(summary.problems, header=f"--strict: {summary.problem_count} row problem(s); nothing was generated:")
    return summary
