"""Streaming readers for user pretraining text.

A corpus can be larger than memory, so every reader yields one document at a
time and never loads a whole file (the one exception is a ``.json`` file that
holds a single JSON array, which JSON itself cannot stream).

Supported formats, chosen by extension:

- ``.jsonl`` / ``.json``: one JSON object per line with a text field (minimind's
  format); blank lines are ignored. A ``.json`` file whose first character is
  ``[`` is read as one JSON array of such objects (:func:`iter_json_records`, which
  the chat readers use too).
- ``.txt``: documents separated by one or more blank lines.
- ``.csv``: the csv module, column ``text_field``.
- ``.parquet``: pyarrow record batches, column ``text_field`` (``pip install 'xiaolm[data]'``).
- ``.jsonl.gz``, ``.json.gz``, ``.txt.gz``, ``.csv.gz``: the same, gzip-compressed.

A malformed record raises :class:`BadRecordError` naming ``file:line`` and what is
wrong, so a user can open the file at that line; ``skip_bad=True`` counts and
skips such records instead, for messy scraped data.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "BadRecordError",
    "ReadStats",
    "iter_documents",
    "iter_json_records",
    "keep_good_records",
    "list_data_files",
]

SUPPORTED_EXTENSIONS = (
    ".jsonl",
    ".json",
    ".txt",
    ".csv",
    ".parquet",
    ".jsonl.gz",
    ".json.gz",
    ".txt.gz",
    ".csv.gz",
)

# xiaolm writes a manifest.json next to every corpus it builds; it describes the
# corpus and is not part of it, so folder recursion leaves it out.
T = TypeVar("T")

_METADATA_FILE_NAMES = frozenset({"manifest.json"})


class BadRecordError(ValueError):
    """A record that cannot become a document; the message reads ``path:line: reason``."""

    def __init__(self, path: str | Path, line: int, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        super().__init__(f"{self.path}:{line}: {reason}")


@dataclass
class ReadStats:
    """Counts filled in while reading, so a caller can report what was skipped."""

    num_documents: int = 0
    """Documents yielded."""
    num_bad: int = 0
    """Malformed records skipped (only with ``skip_bad=True``)."""
    bad_examples: list[str] = field(default_factory=list)
    """The first few skipped records as ``path:line: reason``, to show the user where to look."""
    max_examples: int = 10
    """How many ``bad_examples`` to keep; the rest are only counted."""

    def record_bad(self, error: BadRecordError) -> None:
        """Count one skipped record, keeping its location while there is room."""
        self.num_bad += 1
        if len(self.bad_examples) < self.max_examples:
            self.bad_examples.append(str(error))

    def report_skipped(self) -> None:
        """Print how many records were skipped and where the first ones are; nothing if none was."""
        if self.num_bad:
            print(f"skipped {self.num_bad} bad record(s); first: {self.bad_examples[:3]}")


def _extension(path: Path) -> str | None:
    """The supported extension ``path`` ends with (longest match), or None."""
    name = path.name.lower()
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return None


def list_data_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders into the data files to read, in a stable order.

    Folders are walked recursively in sorted order and contribute only files
    with a supported extension (hidden files and xiaolm's ``manifest.json`` are
    skipped), so a folder can hold a README next to the data. A file named
    explicitly must have a supported extension.
    """
    if isinstance(paths, (str, Path)):
        raise ValueError(
            f"paths must be a list of files or folders, got the single path {str(paths)!r}; "
            f"wrap it in a list: [{str(paths)!r}]"
        )
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    child = Path(dirpath) / name
                    if name.startswith(".") or name in _METADATA_FILE_NAMES or _extension(child) is None:
                        continue
                    found.append(child)
            files.extend(found)
        elif path.is_file():
            if _extension(path) is None:
                raise ValueError(
                    f"{path}: unsupported file type; expected one of {', '.join(SUPPORTED_EXTENSIONS)}"
                )
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    return files


def iter_documents(
    paths: Sequence[str | Path],
    *,
    text_field: str = "text",
    skip_bad: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """Yield the documents of every file under ``paths``, streaming.

    ``text_field`` names the JSON key / CSV or parquet column holding the text.
    A malformed record raises :class:`BadRecordError` unless ``skip_bad`` is set,
    in which case it is counted in ``stats`` and skipped. All paths are checked
    before the first document is yielded, so a typo fails fast.
    """
    files = list_data_files(paths)
    for path in files:
        yield from keep_good_records(_iter_file(path, text_field), skip_bad, stats)


def keep_good_records(
    items: Iterable[T | BadRecordError], skip_bad: bool, stats: ReadStats | None = None
) -> Iterator[T]:
    """Pass records through; raise the first :class:`BadRecordError`, or with ``skip_bad``
    count it in ``stats`` and go on. Every reader (text, chat, preferences) judges bad
    records here, so they all behave alike."""
    stats = stats if stats is not None else ReadStats()
    for item in items:
        if isinstance(item, BadRecordError):
            if not skip_bad:
                raise item
            stats.record_bad(item)
            continue
        stats.num_documents += 1
        yield item


def _iter_file(path: Path, text_field: str) -> Iterator[str | BadRecordError]:
    """Documents of one file, with malformed records yielded as errors for the caller to judge."""
    ext = _extension(path)
    compressed = ext is not None and ext.endswith(".gz")
    base = ext.removesuffix(".gz") if ext else None
    if base == ".parquet":
        yield from _iter_parquet(path, text_field)
        return
    with _open_binary(path, compressed) as raw:
        if base in (".jsonl", ".json"):
            for line_no, record in _json_records(path, raw):
                if isinstance(record, BadRecordError):
                    yield record
                else:
                    yield _check_record(path, line_no, record, text_field)
        elif base == ".txt":
            yield from _iter_txt(path, raw)
        elif base == ".csv":
            yield from _iter_csv(path, raw, text_field)
        else:  # list_data_files only passes supported extensions
            raise AssertionError(f"unhandled extension {ext} for {path}")


@contextlib.contextmanager
def _open_binary(path: Path, compressed: bool) -> Iterator[IO[bytes]]:
    """Open for binary reading with a buffer that supports ``peek``. A ``.gz`` file that is not
    gzip, or whose compressed data stops early, is an error naming it while it is read; ``skip_bad``
    does not skip it: the file is damaged, not one of its records."""
    try:
        raw = io.BufferedReader(gzip.open(path, "rb")) if compressed else open(path, "rb")  # type: ignore[arg-type]
        with raw:
            yield raw
    except gzip.BadGzipFile as err:
        if "Not a gzipped file" in str(err):
            with open(path, "rb") as handle:
                start = handle.read(8)
            raise ValueError(f"{path}: not gzip-compressed although its name ends in .gz (it starts with "
                             f"{start!r}); rename it without .gz") from None
        raise ValueError(f"{path}: damaged gzip data ({err}): re-download or recompress it") from None
    except (EOFError, zlib.error):
        raise ValueError(f"{path}: the gzip stream stops before its end (a truncated file?): "
                         "re-download or recompress it") from None


def _decode_lines(path: Path, raw: Iterable[bytes]) -> Iterator[tuple[int, str | BadRecordError]]:
    """(1-based line number, text) per line; decoding per line gives exact locations for bad UTF-8."""
    for line_no, data in enumerate(raw, start=1):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            yield (
                line_no,
                BadRecordError(path, line_no, f"not valid UTF-8 ({err.reason} at byte {err.start})"),
            )
            continue
        if line_no == 1:
            text = text.removeprefix("\ufeff")
        yield line_no, text


def _check_record(path: Path, line_no: int, record: object, text_field: str) -> str | BadRecordError:
    """The text of one parsed record, or what is wrong with it."""
    if not isinstance(record, dict):
        return BadRecordError(
            path, line_no, f"expected a JSON object with field {text_field!r}, got {type(record).__name__}"
        )
    if text_field not in record:
        keys = sorted(record)[:20]
        return BadRecordError(
            path,
            line_no,
            f"field {text_field!r} is missing (keys: {keys}); pass text_field= to read another field",
        )
    return _check_text(path, line_no, record[text_field], text_field)


def _check_text(path: Path, line_no: int, value: object, text_field: str) -> str | BadRecordError:
    """``value`` if it is a non-empty string, else what is wrong with it."""
    if not isinstance(value, str):
        return BadRecordError(
            path, line_no, f"field {text_field!r} is {type(value).__name__}, expected a string"
        )
    if not value.strip():
        return BadRecordError(path, line_no, f"field {text_field!r} is empty")
    return value


def iter_json_records(path: str | Path) -> Iterator[tuple[int, Any | BadRecordError]]:
    """(line, record) for each record of a JSON lines file, or of a ``.json`` file holding one JSON
    array (gzipped or not), with the line where the record starts, so errors point into
    pretty-printed JSON too. What cannot be parsed comes as a :class:`BadRecordError` in the
    record's place."""
    path = Path(path)
    ext = _extension(path)
    with _open_binary(path, ext is not None and ext.endswith(".gz")) as raw:
        yield from _json_records(path, raw)


def _json_records(path: Path, raw: IO[bytes]) -> Iterator[tuple[int, Any | BadRecordError]]:
    if _extension(path) in (".json", ".json.gz"):  # .jsonl is JSON lines, whatever it starts with
        first = raw.peek(64)[:64].lstrip() if hasattr(raw, "peek") else b""
        if first.startswith(b"\xef\xbb\xbf"):
            first = first[3:].lstrip()
        if first.startswith(b"["):
            yield from _json_array_records(path, raw.read())
            return
    for line_no, line in _decode_lines(path, raw):
        if isinstance(line, BadRecordError):
            yield line_no, line
        elif line.strip():
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as err:
                yield line_no, _bad_json(path, line_no, err)


def _bad_json(path: Path, line_no: int, err: json.JSONDecodeError) -> BadRecordError:
    return BadRecordError(path, line_no, f"bad JSON ({err.msg} at column {err.colno})")


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _json_array_records(path: Path, data: bytes) -> Iterator[tuple[int, Any | BadRecordError]]:
    """The records of one JSON array, one at a time, each with the line it starts on. The first
    syntax error ends the file: after it, where the next record starts is unknown."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_no = data.count(b"\n", 0, err.start) + 1
        yield line_no, BadRecordError(path, line_no, f"not valid UTF-8 ({err.reason} at byte {err.start})")
        return
    del data  # a large array is held once, as text
    decoder = json.JSONDecoder()
    line_no, counted_to = 1, 0  # newlines counted up to text[counted_to]: counting stays linear

    def line_at(position: int) -> int:
        nonlocal line_no, counted_to
        line_no += text.count("\n", counted_to, position)
        counted_to = position
        return line_no

    position = _JSON_SPACE.match(text, text.index("[") + 1).end()
    closed = text.startswith("]", position)
    try:
        while not closed:
            record, end = decoder.raw_decode(text, position)
            yield line_at(position), record
            position = _JSON_SPACE.match(text, end).end()
            if text.startswith(",", position):
                position = _JSON_SPACE.match(text, position + 1).end()
            elif text.startswith("]", position):
                closed = True
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter", text, position)
        rest = _JSON_SPACE.match(text, position + 1).end()
        if rest < len(text):
            raise json.JSONDecodeError("Extra data", text, rest)
    except json.JSONDecodeError as err:
        yield err.lineno, _bad_json(path, err.lineno, err)


def _iter_txt(path: Path, raw: IO[bytes]) -> Iterator[str | BadRecordError]:
    lines: list[str] = []
    for _, line in _decode_lines(path, raw):
        if isinstance(line, BadRecordError):
            yield line
            continue
        line = line.rstrip("\r\n")
        if line.strip():
            lines.append(line)
        elif lines:
            yield "\n".join(lines)
            lines = []
    if lines:
        yield "\n".join(lines)


def _iter_csv(path: Path, raw: IO[bytes], text_field: str) -> Iterator[str | BadRecordError]:
    # documents are often longer than csv's default 128 KiB field limit
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    text_stream = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
    reader = csv.DictReader(text_stream)
    try:
        header = reader.fieldnames
    except UnicodeDecodeError as err:
        raise BadRecordError(path, 1, f"not valid UTF-8 ({err.reason})") from None
    if not header or text_field not in header:
        # a header without the column makes every row unusable: not a skippable record
        raise BadRecordError(
            path,
            1,
            f"column {text_field!r} is missing (header: {header}); pass text_field= to read another column",
        )
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError as err:
            # decoding happens in blocks, so the position is that of the last good row
            raise BadRecordError(path, reader.line_num + 1, f"not valid UTF-8 ({err.reason})") from None
        except csv.Error as err:
            yield BadRecordError(path, reader.line_num, f"bad CSV ({err})")
            continue
        yield _check_text(path, reader.line_num, row.get(text_field), text_field)


def _iter_parquet(path: Path, text_field: str) -> Iterator[str | BadRecordError]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"{path}: reading parquet needs pyarrow; install it with pip install 'xiaolm[data]'"
        ) from None
    parquet_file = pq.ParquetFile(path)
    names = parquet_file.schema_arrow.names
    if text_field not in names:
        raise BadRecordError(
            path,
            1,
            f"column {text_field!r} is missing (columns: {names}); pass text_field= to read another column",
        )
    row = 0
    for batch in parquet_file.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1  # parquet has no lines: the number is the 1-based row
            yield _check_text(path, row, value, text_field)
