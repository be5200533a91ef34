"""Catalogs: CSV (UTF-8, with or without BOM) and Parquet, streamed in batches of rows.

A catalog argument is a file, a glob pattern (``catalogs/*.csv``, expanded by ``expand_sources``;
local paths only) or an ``s3://bucket/key`` object named in full (S3 patterns are not expanded),
read in blocks with pyarrow's S3 file system (standard AWS settings: ``AWS_ENDPOINT_URL``, keys or
profile).

Each row keeps the file it came from and its 1-based data row number (the header is not
counted), which the manifest and job ids use, and for CSV the line of the file it starts on (what an
editor or Excel shows: the header is line 1, and a quoted value over several lines moves the rows
after it down), which messages name with the sku. Parquet is read with pyarrow,
batch by batch. CSV is read with the standard library's streaming reader: unlike pyarrow's
CSV reader, it reports the exact position of a malformed row (pyarrow's
``InvalidRow.number`` is ``None``), which users need to fix their file.

Empty values count as missing: an empty or blank CSV cell, a Parquet null and a float NaN (how
pandas writes a missing value); a CSV row whose cells are all blank is skipped. A whole float in the
``sku`` or ``seed`` column of a Parquet file becomes an int (pandas turns an int column with a gap
into floats: sku 1002 becomes 1002.0), so it names the product as the user wrote it; other columns
keep their values. CSV text is kept as written: a CSV sku ``1002.0`` stays ``1002.0`` (give the
column pandas' ``Int64`` dtype before ``to_csv`` to get ``1002``); planning reads a seed ``11.0``
as 11. Parquet list, struct, map and binary columns have no text a prompt
could use: ``not_text`` names them, and planning refuses a template that uses one (a ``sku`` of
that kind is refused when the catalog is opened). Parquet column names are stripped of spaces, as
CSV header names are.

The header must be on line 1 (after Excel's ``sep=,`` line, which is skipped); a byte order mark
(U+FEFF) at the start of any line is removed, and a data row that repeats the header (files joined
with ``cat``) is a ``RowProblem``. A CSV row with the wrong number of fields is a ``RowProblem``;
the other rows still run. A row over several lines (a quoted value with line breaks) that ends
inside a quote at the end of the file, or has text after a closing quote, is a ``CatalogError``
raised when it is met: an unclosed quote swallows the rows after it, and planning without them
would take their skus for removed products.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CatalogError

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
# files a catalog glob may match that hold a catalog this reader cannot read: refused, not skipped
UNREADABLE = (".gz", ".zip", ".bz2", ".xz", ".zst", ".xlsx", ".xlsm", ".xls", ".ods", ".tsv", ".tab", ".json",
              ".jsonl", ".feather", ".arrow")
OTHER_SEPARATORS = {";": "';'", "\t": "tabs", "|": "'|'"}  # what a header that is one column may hide
FIELD_LIMIT = 64 * 1024 * 1024  # the longest CSV value (the csv module's default, 128 KiB, is too short for HTML)
BOM = b"\xef\xbb\xbf"
_CHINESE = re.compile("[\u3400-\u9fff]")
_SCIENTIFIC = re.compile(r"\d(?:[.,]\d+)?E\+\d+", re.IGNORECASE)  # 1.23457E+11: Excel's view of a long numeric sku
_GB_PAIRS = re.compile(b"(?:[\x00-\x7f]|[\x81-\xfe][\x80-\xfe])*")  # GB18030 text whose characters are all 2-byte


@dataclass(frozen=True, slots=True)
class Row:
    """One catalog row: its source, its 1-based data row number, its non-empty values and, for CSV,
    the line of the file it starts on (None for Parquet, which has no lines)."""

    catalog: str
    row: int
    values: dict[str, Any]
    line: int | None = None

    @property
    def sku(self) -> str:
        return str(self.values.get("sku", ""))


@dataclass(frozen=True, slots=True)
class RowProblem:
    """A row that cannot be used; the other rows still run (unless ``--strict``)."""

    catalog: str
    row: int
    message: str
    sku: str = ""  # when the row names one: it is still in the catalog, even if it cannot run
    line: int | None = None  # CSV: the line of the file the row starts on; None for Parquet

    def __str__(self) -> str:
        return f"{self.catalog}, {row_place(self.row, self.line)}{sku_note(self.sku)}: {self.message}"


def row_place(row: int, line: int | None) -> str:
    """Where a row is for a person: the file's line (what an editor or Excel shows) for CSV, else the row."""
    return f"line {line}" if line is not None else f"row {row}"


def sku_label(sku: str) -> str:
    """A sku as a message shows it: quoted only when spaces or invisible characters would hide its ends."""
    return sku if sku.isprintable() and sku.strip() == sku and " " not in sku else repr(sku)


def sku_note(sku: str) -> str:
    """`` (sku MUG-002)`` after a row's place, or nothing for a row without a sku."""
    return f" (sku {sku_label(sku)})" if sku else ""


def expand_sources(sources: Iterable[str]) -> tuple[list[str], list[str]]:
    """Expand glob patterns (``catalogs/*.csv``, sorted by name) into files; return (paths, problems).

    A source without ``*``, ``?`` or ``[`` (or an existing file of that name) is kept as it is. A
    pattern that matches nothing, or matches catalogs this reader cannot read (``UNREADABLE``:
    .csv.gz, .xlsx, .tsv, ...), is a problem. A file named twice, however spelled, is read once."""
    paths: list[str] = []
    problems: list[str] = []
    seen: set[str] = set()
    for source in sources:
        if not glob.has_magic(source) or Path(source).is_file() or "://" in source:
            matches = [source]
        else:
            found = sorted(glob.glob(source, recursive=True))
            matches = [m for m in found if Path(m).suffix.lower() in FORMATS]
            unreadable = [m for m in found if m.lower().endswith(UNREADABLE) and Path(m).is_file()]
            if unreadable:
                problems.append(
                    f"Catalog pattern {source!r} matches file(s) this reader cannot read: {', '.join(unreadable)}. "
                    f"Convert each to CSV (UTF-8, comma-separated) or Parquet (Excel: Save As 'CSV UTF-8'; .gz: "
                    f"`gunzip -k FILE`; .tsv: save with commas), or narrow the pattern (e.g. '*.csv') to leave them out."
                )
            elif not matches:
                problems.append(f"Catalog pattern {source!r} matches no .csv or .parquet file (relative to {Path.cwd()}). "
                                f"Check the folder and the pattern, and quote it so the shell passes it as it is.")
        for match in matches:
            key = match if "://" in match else os.path.realpath(match)  # base.csv and ./base.csv are one file
            if key not in seen:
                seen.add(key)
                paths.append(match)
    return paths, problems


class Catalog:
    """A catalog file, opened lazily; ``columns`` is read from the header or schema."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = str(path)
        suffix = self.path.suffix.lower()
        self.s3 = self.name.startswith("s3://")
        if "://" in self.name and not self.s3:
            raise CatalogError(
                f"Catalog {self.name}: reading catalogs from a URL ({self.name.split('://')[0]}://) is not supported. "
                f"Use a local file, a glob, or s3://BUCKET/KEY."
            )
        if self.s3 and glob.has_magic(self.name) and suffix not in FORMATS:  # s3://bucket/catalogs/*
            raise CatalogError(s3_pattern_problem(self.name, _s3_matches(self.name)))
        if suffix not in FORMATS:
            raise CatalogError(
                f"Catalog {self.name}: unknown file type {suffix or '(no extension)'!r}. "
                f"Use a .csv (UTF-8) or .parquet file."
            )
        if not self.s3 and not self.path.is_file():
            raise CatalogError(
                f"Catalog {self.name} does not exist or is not a file. Check the path "
                f"(it is relative to {Path.cwd()})."
            )
        self.format = FORMATS[suffix]
        self.not_text: dict[str, str] = {}  # Parquet columns of lists, structs, maps or bytes: name -> type
        self.text_typed: set[str] | None = None  # Parquet columns of strings; None for CSV (every value is text)
        self.columns = self._read_columns()
        if "sku" in self.not_text:
            raise CatalogError(self.not_text_problem({"sku"}))
        if "sku" not in self.columns:
            near = [c for c in self.columns if "".join(ch for ch in c if ch.isprintable()).casefold() == "sku"]
            hint = f"; did you mean {near[0]!r}? Column names are case-sensitive: rename it to 'sku'" if near else ""
            raise CatalogError(
                f"Catalog {self.name} has no 'sku' column{hint} (its columns: {shown(self.columns) or 'none'}). "
                f"Every catalog needs a 'sku' column: it names the output folders and seeds the images."
                f"{self._separator_hint()}"
            )

    @property
    def text_columns(self) -> set[str]:
        """Columns whose values reach a template as text: every CSV column (values are never converted, so a
        sku ``00123`` keeps its zeros), and Parquet columns of strings."""
        return set(self.columns) if self.text_typed is None else set(self.text_typed)

    def not_text_problem(self, used: set[str]) -> str:
        """Why these columns (lists, structs, maps or bytes) cannot go into a prompt, and the fix."""
        named = ", ".join(f"{name!r} ({self.not_text[name]})" for name in sorted(used))
        return (f"Catalog {self.name}: column(s) {named} hold lists, structs, maps or bytes, which would reach "
                f"prompts as Python text such as \"['a', 'b']\". Flatten each to a text column (e.g. join a list "
                f"with ', ') and export the file again, or do not use it in the template.")

    def _separator_hint(self) -> str:
        """A hint when the CSV header is one column holding ';', tabs or '|': the file uses another separator."""
        if self.format != "csv" or len(self.columns) != 1:
            return ""
        for separator, name in OTHER_SEPARATORS.items():
            if separator in self.columns[0]:
                return (f" The file looks separated by {name}: save it as comma-separated CSV "
                        f"(this reader only takes commas).")
        return ""

    def _read_columns(self) -> list[str]:
        if self.format == "parquet":
            import pyarrow.parquet as pq

            try:
                schema = pq.ParquetFile(self._open(random_access=True)).schema_arrow
            except CatalogError:
                raise
            except Exception as exc:  # pyarrow raises several types for a bad file
                raise CatalogError(
                    f"Catalog {self.name} is not a readable Parquet file ({exc}). "
                    f"Re-export it, or save it as CSV."
                ) from None
            names = list(schema.names)
            self.not_text = {field.name.strip(): str(field.type) for field in schema if _not_text(field.type)}
            self.text_typed = {field.name.strip() for field in schema if _string(field.type)}
        else:
            try:
                with self._open() as f:
                    names = self._header(_reader(self._decoded_lines(f)))
            except OSError as exc:
                raise CatalogError(f"Catalog {self.name} cannot be read: {exc.strerror}.") from None
            except csv.Error as exc:
                raise CatalogError(f"Catalog {self.name}: malformed CSV header ({exc}). {_csv_hint(exc)}") from None
        names = [n.strip() for n in names]
        if not names or all(not n for n in names):
            raise CatalogError(f"Catalog {self.name} is empty: it needs a header row with column names.")
        blanks = [str(i + 1) for i, n in enumerate(names) if not n]
        if blanks:
            raise CatalogError(
                f"Catalog {self.name}: header column(s) {', '.join(blanks)} have no name. "
                f"Give every column a name in the first row."
            )
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise CatalogError(
                f"Catalog {self.name}: column name(s) {shown(dupes)} appear more than once "
                f"in the header. Rename them so each column is unique."
            )
        return names

    def _header(self, reader) -> list[str]:
        """The CSV header: the first line, or the second after Excel's ``sep=,`` line."""
        names = next(reader, None)
        if names is not None and reader.line_num == 1 and re.fullmatch(r"sep=.?", ",".join(names).strip(), re.I):
            names = next(reader, None)
        if names is None:
            raise CatalogError(f"Catalog {self.name} is empty: it needs a header row with column names.")
        if not any(n.strip() for n in names):
            raise CatalogError(
                f"Catalog {self.name}: line {reader.line_num} is blank, but the header (the column names) must be the "
                f"first line of the file. Delete the blank line(s) above the header."
            )
        return names

    def batches(self, size: int = 10_000) -> Iterator[list[Row | RowProblem]]:
        """Yield rows (or problems for malformed rows) in batches of ``size``."""
        reader = self._parquet_rows if self.format == "parquet" else self._csv_rows
        batch: list[Row | RowProblem] = []
        for item in reader(size):
            batch.append(item)
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch

    def rows(self, size: int = 10_000) -> Iterator[Row | RowProblem]:
        """Yield every row (or row problem) in order."""
        for batch in self.batches(size):
            yield from batch

    def _parquet_rows(self, size: int) -> Iterator[Row | RowProblem]:
        import pyarrow.parquet as pq

        number = 0
        try:
            for record_batch in pq.ParquetFile(self._open(random_access=True)).iter_batches(batch_size=size):
                for values in record_batch.rename_columns(self.columns).to_pylist():  # the stripped names
                    number += 1
                    yield self._make_row(number, values)
        except Exception as exc:
            raise CatalogError(
                f"Catalog {self.name}: reading failed after row {number} ({exc}). "
                f"The file may be truncated or corrupt; re-export it."
            ) from None

    def _csv_rows(self, size: int) -> Iterator[Row | RowProblem]:
        number = 0
        with self._open() as f:
            lines = _Lines(self._decoded_lines(f))
            reader = _reader(lines)
            sku_at = self.columns.index("sku")
            try:
                self._header(reader)  # already checked by _read_columns
                lines.taken = []
                for fields in reader:
                    text, lines.taken = lines.taken, []  # the physical lines of this record
                    if all(not field.strip() for field in fields):
                        continue  # a blank line, or one of blank cells (",,", "  ,  ")
                    number += 1
                    first = reader.line_num - len(text) + 1  # the line the record starts on
                    if lines.ended or (len(text) > 1 and not self._sound(text)):
                        raise self._unclosed_quote(number, fields, first, reader.line_num, lines.ended)
                    if [field.strip() for field in fields] == self.columns:
                        yield RowProblem(self.name, number, "the line repeats the header (the column names): were "
                                         "files concatenated? Delete the line, or join exports without their header "
                                         "lines (e.g. `tail -n +2 FILE`).", line=first)
                        continue
                    if len(fields) != len(self.columns):
                        yield RowProblem(
                            self.name,
                            number,
                            f"the row has {len(fields)} fields but the header has {len(self.columns)}. Check for an "
                            f"unquoted comma or a missing field; quote values that contain commas.",
                            fields[sku_at].strip() if sku_at < len(fields) else "",
                            first,
                        )
                        continue
                    yield self._make_row(number, dict(zip(self.columns, fields)), first)
            except csv.Error as exc:
                if "field larger than field limit" in str(exc):
                    read = sum(len(line) for line in lines.taken)
                    raise CatalogError(
                        f"Catalog {self.name}: data row {number + 1} (from line {reader.line_num - len(lines.taken) + 1}) "
                        f"holds a value longer than {FIELD_LIMIT >> 20} MiB, the most this reader takes ({read:,} "
                        f"characters read for the row so far). Shorten that value (e.g. move inline images out of a "
                        f"description), or, if it should be short, close the quote that opens it."
                    ) from None
                raise CatalogError(
                    f"Catalog {self.name}: malformed CSV near line {reader.line_num} ({exc}). {_csv_hint(exc)}"
                ) from None

    @staticmethod
    def _sound(text: list[str]) -> bool:
        """Whether a record over several lines has no text after a closing quote (a quote that closed
        another, unclosed one, rows later); a wrong field count alone is a row problem, as on one line."""
        try:
            next(csv.reader(text, strict=True))  # strict: text after a closing quote is an error
        except csv.Error:
            return False
        return True

    def _unclosed_quote(self, number: int, fields: list[str], first: int, last: int, at_end: bool) -> CatalogError:
        """The error for a record that an unclosed quote ran on: it names the line where the quote opened."""
        # the quote opened in the last field that holds a line break: count the line breaks before it
        spanning = [i for i, field in enumerate(fields) if "\n" in field]
        opened = first + sum(field.count("\n") for field in fields[:spanning[-1]]) if spanning else first
        if at_end:
            what = f"is never closed: it runs to the end of the file (line {last}), taking in every row after it"
        else:
            count = (f", leaving it with {len(fields)} fields where the header has {len(self.columns)}"
                     if len(fields) != len(self.columns) else "")
            what = (f"runs on to line {last}, taking in the lines in between{count}: the "
                    f"quote is most likely not closed")
        return CatalogError(
            f"Catalog {self.name}: the quoted value that opens on line {opened} (data row {number}) {what}. Close the quote, or "
            f"double a quote inside a quoted value (\"\"). Reading stopped here so that no row is silently lost."
        )

    def _open(self, random_access: bool = False):
        """A binary file object: the local file, or the S3 object streamed in blocks (never downloaded whole)."""
        if not self.s3:
            return open(self.path, "rb")
        endpoint = os.environ.get("AWS_ENDPOINT_URL")  # the standard AWS variable, as boto3 reads it
        try:
            fs = _s3_file_system()
            where = self.name[len("s3://"):]
            stream = fs.open_input_file(where) if random_access else fs.open_input_stream(where)
        except FileNotFoundError:
            if glob.has_magic(self.name):
                raise CatalogError(s3_pattern_problem(self.name, _s3_matches(self.name))) from None
            raise CatalogError(f"Catalog {self.name} does not exist (no such object{f' at {endpoint}' if endpoint else ''}). "
                               f"Check the bucket and key, e.g. `aws s3 ls {self.name}`.") from None
        except OSError as exc:
            reason = str(exc).splitlines()[0][:200]
            pattern = (" Patterns (*, ?, [...]) are expanded only for local paths: name each S3 catalog in full."
                       if glob.has_magic(self.name) else "")
            raise CatalogError(f"Catalog {self.name} cannot be read from S3{f' at {endpoint}' if endpoint else ''} ({reason}). "
                               f"Check the bucket, the credentials (AWS_ACCESS_KEY_ID/AWS_PROFILE) and AWS_ENDPOINT_URL."
                               f"{pattern}") from None
        return stream if random_access else _LineReader(stream)

    def _decoded_lines(self, f) -> Iterator[str]:
        """Decode line by line, so a non-UTF-8 line is reported by its number; a BOM that starts a line
        (every file of a ``cat`` of Excel exports has one) is removed."""
        converted = f"{Path(self.name).stem}-utf8.csv"
        for number, raw in enumerate(f, start=1):
            if number == 1 and (raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw):
                encoding = "UTF-16" if raw[:1] in (b"\xff", b"\xfe") else "UTF-16LE" if raw[1:2] == b"\x00" else "UTF-16BE"
                raise CatalogError(
                    f"Catalog {self.name} is UTF-16 text (what Excel saves as 'Unicode Text', which is separated by "
                    f"tabs), not UTF-8. In Excel, save it as 'CSV UTF-8 (Comma delimited)' instead; or convert it with "
                    f"`iconv -f {encoding} -t UTF-8 {self.name} > {converted}` and, if it is separated by tabs, "
                    f"replace them with commas."
                )
            while raw.startswith(BOM):
                raw = raw[len(BOM):]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                if _GB_PAIRS.fullmatch(raw) and _CHINESE.search(raw.decode("gb18030", "replace")):
                    guess = "Its bytes read as Chinese, so it is probably GB18030 (GBK): `iconv -f GB18030"
                else:
                    guess = "It is probably Western European text from Excel (Windows-1252): `iconv -f CP1252"
                raise CatalogError(
                    f"Catalog {self.name}: line {number} is not UTF-8 text. Save the file as 'CSV UTF-8' (Excel) or "
                    f"convert it. {guess} -t UTF-8 {self.name} > {converted}` (a guess from that line: check the "
                    f"converted file before using it)."
                ) from None

    def _make_row(self, number: int, values: dict[str, Any], line: int | None = None) -> Row | RowProblem:
        clean = {}
        for key, value in values.items():
            if isinstance(value, str):
                value = value.strip()
                if not value:
                    continue
            elif value is None:
                continue
            elif isinstance(value, float):
                if math.isnan(value):
                    continue  # how pandas writes a missing value
                if key in ("sku", "seed") and value.is_integer():
                    value = int(value)  # an int column pandas made float because of a gap: 1002.0 -> 1002
            clean[key] = value
        if "sku" not in clean:
            return RowProblem(self.name, number, "the 'sku' column is empty; every row needs a sku.", line=line)
        if isinstance(clean["sku"], str) and _SCIENTIFIC.fullmatch(clean["sku"]):
            return RowProblem(self.name, number, "the sku looks like a number Excel turned into scientific notation, "
                              "which also rounds it (two products can end up with one sku). Format the sku column "
                              "as Text in Excel, re-enter those skus and export again.", clean["sku"], line)
        return Row(self.name, number, clean, line)


def s3_pattern_problem(source: str, matches: list[str] | None = None) -> str:
    """Why ``s3://bucket/*.csv`` found nothing: patterns are expanded only for local paths. ``matches``
    (the objects the pattern would match, when they could be listed) are named so they can be passed."""
    folder = _s3_folder(source)
    if matches:
        shown_matches = " ".join(matches[:10]) + (f" (and {len(matches) - 10} more)" if len(matches) > 10 else "")
        example = f"it would match {shown_matches}: pass them one by one"
    else:
        example = f"e.g. {folder}a.csv {folder}b.csv (list them with `aws s3 ls {folder}`)"
    return (f"Catalog {source}: no S3 object has this name, and patterns (*, ?, [...]) are expanded only for local "
            f"paths, not on S3. Name each S3 catalog in full: {example}; or copy them to a local folder and use the "
            f"pattern there.")


def _s3_folder(source: str) -> str:
    """``s3://bucket/catalogs/`` for ``s3://bucket/catalogs/*.csv``: up to the last ``/`` before the pattern starts."""
    return source[: source.rfind("/", 0, min(source.find(c) for c in "*?[" if c in source)) + 1]


def _s3_file_system():
    """pyarrow's S3 file system with the standard AWS settings (``AWS_ENDPOINT_URL``, keys or profile, region)."""
    import pyarrow.fs

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return pyarrow.fs.S3FileSystem(endpoint_override=os.environ.get("AWS_ENDPOINT_URL"), region=region)


def _s3_matches(source: str) -> list[str]:
    """The catalogs (.csv, .parquet) an S3 pattern would match, for the message; empty when they cannot be listed."""
    import fnmatch

    import pyarrow.fs

    folder = _s3_folder(source)
    if folder == "s3://":  # a pattern in the bucket's name: not listed (that would list every bucket)
        return []
    deeper = "/" in source[len(folder):]  # list below the folder only when the pattern goes there
    try:
        infos = _s3_file_system().get_file_info(pyarrow.fs.FileSelector(folder[len("s3://"):], recursive=deeper))
    except Exception:  # no such bucket, no permission to list, ...: the message names a placeholder instead
        return []
    names = sorted(f"s3://{info.path}" for info in infos if info.type == pyarrow.fs.FileType.File)
    return [name for name in names if fnmatch.fnmatchcase(name, source) and Path(name).suffix.lower() in FORMATS]


def shown(names: Iterable[str]) -> str:
    """Column names for a message, comma-separated; a name with invisible characters is shown with repr."""
    return ", ".join(name if name.isprintable() else repr(name) for name in names)


def _reader(lines: Iterable[str]):
    """A CSV reader that takes values up to ``FIELD_LIMIT`` long (long HTML descriptions, inline images)."""
    csv.field_size_limit(FIELD_LIMIT)
    return csv.reader(lines)


def _csv_hint(exc: csv.Error) -> str:
    """What to do about an error of the csv module."""
    if "new-line character seen in unquoted field" in str(exc):  # lines end in a bare CR: Excel for Mac's old "CSV"
        return ("Its lines end in a carriage return alone (old Mac line endings): save it as 'CSV UTF-8' "
                "(Excel) or convert the line endings, e.g. `tr '\\r' '\\n'`.")
    return "Check that quotes are balanced."


def _not_text(type_) -> bool:
    """Whether a Parquet column type is nested (list, struct, map) or binary: values with no text for a prompt."""
    import pyarrow.types as types

    if types.is_dictionary(type_):
        type_ = type_.value_type
    binary = (types.is_binary, types.is_large_binary, types.is_fixed_size_binary, types.is_binary_view)
    return types.is_nested(type_) or any(check(type_) for check in binary)


def _string(type_) -> bool:
    """Whether a Parquet column type holds strings (values that reach a template as text)."""
    import pyarrow.types as types

    if types.is_dictionary(type_):
        type_ = type_.value_type
    return types.is_string(type_) or types.is_large_string(type_) or getattr(types, "is_string_view", lambda t: False)(type_)


class _Lines:
    """Lines for the CSV reader: ``taken`` keeps those read since it was last emptied, and ``ended``
    tells when they ran out (a record that comes back after that was cut off by the end of the file)."""

    def __init__(self, lines: Iterable[str]):
        self.lines, self.taken, self.ended = lines, [], False

    def __iter__(self) -> Iterator[str]:
        for line in self.lines:
            self.taken.append(line)
            yield line
        self.ended = True


class _LineReader:
    """Binary lines from a stream that only reads blocks (pyarrow's S3 input streams)."""

    def __init__(self, stream, block: int = 1 << 20):
        self.stream, self.block = stream, block

    def __enter__(self) -> _LineReader:
        return self

    def __exit__(self, *exc) -> None:
        self.stream.close()

    def __iter__(self) -> Iterator[bytes]:
        pending = b""
        while True:
            chunk = self.stream.read(self.block)
            if not chunk:
                break
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for line in lines:
                yield line + b"\n"
        if pending:
            yield pending
