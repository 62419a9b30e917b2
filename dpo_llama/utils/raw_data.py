"""Read raw data files into rows, with a location for every row and an account of bad rows.

This module knows nothing about chat formats. It turns a data file into ``(row, location)``
pairs, where ``row`` is a plain ``dict`` and ``location`` points back into the file:

* ``"path:LINE"`` (1-based line number) for JSON Lines files,
* ``"path:[INDEX]"`` (0-based position) for JSON arrays and Parquet files.

Supported files:

* ``.jsonl`` / ``.jsonl.gz``: one JSON object per line (blank lines are ignored).
* ``.json`` / ``.json.gz``: a top-level list of objects (Stanford Alpaca, LLaMA-Factory), or
  ``{"data": [...]}`` (the shape the Hugging Face ``json`` loader reads with ``field="data"``).
  A ``.json`` file that is really JSON Lines is read as JSON Lines: stanfordnlp/SHP ships its
  ``<subreddit>/train.json`` files that way.
* ``.parquet``: needs ``pyarrow`` (imported only when a Parquet file is read).

A line that is not valid JSON, or a row that is not a JSON object, is a *bad row*: it is
counted in a :class:`ParseReport` and skipped, never a crash. The format modules
(``sft_formats``, ``preference_formats``) raise :class:`BadRowError` for rows they cannot
use, and :func:`read_records` counts those the same way.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

PathLike = str | os.PathLike
RowParser = Callable[[dict, str], Any]

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")


class BadRowError(Exception):
    """A row that cannot be used; the loaders count it under ``reason`` and skip it.

    Args:
        reason: Short, stable name used as the counting key, e.g. ``"empty response"``.
        detail: Optional specifics for the first few reported locations.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ParseReport:
    """Counts of kept and skipped rows, the skip reasons, and where the first skips were.

    Attributes:
        files: Files read, in order.
        rows_kept: Rows turned into records.
        skipped: Number of skipped rows per reason.
        first_skipped: ``"location: reason (detail)"`` for the first ``max_examples`` skips.
        max_examples: How many skip locations to remember.
    """

    files: list[str] = field(default_factory=list)
    rows_kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_skipped: list[str] = field(default_factory=list)
    max_examples: int = 5

    @property
    def rows_skipped(self) -> int:
        """Total number of skipped rows."""
        return sum(self.skipped.values())

    @property
    def rows_read(self) -> int:
        """Rows looked at: kept plus skipped."""
        return self.rows_kept + self.rows_skipped

    def skip(self, location: str, reason: str, detail: str = "") -> None:
        """Count one skipped row and remember its location if it is among the first few."""
        self.skipped[reason] += 1
        if len(self.first_skipped) < self.max_examples:
            self.first_skipped.append(f"{location}: {reason}" + (f" ({detail})" if detail else ""))

    def drop(self, location: str, reason: str, detail: str = "") -> None:
        """Move one kept record to the skipped counts (e.g. removed later by tokenization or truncation)."""
        self.rows_kept -= 1
        self.skip(location, reason, detail)

    def merge(self, other: ParseReport) -> None:
        """Add the counts and locations of ``other`` (e.g. one file's report) to this one."""
        self.files.extend(other.files)
        self.rows_kept += other.rows_kept
        self.skipped.update(other.skipped)
        room = self.max_examples - len(self.first_skipped)
        self.first_skipped.extend(other.first_skipped[:max(room, 0)])

    def top_reasons(self, count: int = 3) -> str:
        """The most frequent skip reasons as text, e.g. ``"empty response: 4, malformed JSON: 1"``."""
        return ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common(count))

    def summary(self) -> str:
        """Multi-line, human-readable account for printing at the start of a run."""
        lines = [
            f"Read {self.rows_read} rows from {len(self.files)} file(s): "
            f"kept {self.rows_kept}, skipped {self.rows_skipped}."
        ]
        if self.skipped:
            lines.append("Skipped by reason: " + self.top_reasons(len(self.skipped)))
            lines.append("First skipped rows:")
            lines.extend(f"  {example}" for example in self.first_skipped)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready form, for a run's ``meta.json``."""
        return {
            "files": list(self.files),
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_skipped": self.rows_skipped,
            "skipped_by_reason": dict(self.skipped.most_common()),
            "first_skipped": list(self.first_skipped),
        }


def text_field(row: dict, key: str, required: bool = True) -> str:
    """Return ``row[key]`` as a string, or raise :class:`BadRowError`.

    A missing or ``null`` optional field reads as ``""``.

    Raises:
        BadRowError: ``"missing field"`` or ``"non-string content"``.
    """
    value = row.get(key)
    if value is None:
        if required:
            raise BadRowError("missing field", repr(key))
        return ""
    if not isinstance(value, str):
        raise BadRowError("non-string content", f"field {key!r} is {type(value).__name__}")
    return value


def iter_rows(path: PathLike, report: ParseReport | None = None) -> Iterator[tuple[dict, str]]:
    """Yield ``(row, location)`` for every JSON object in a data file.

    Args:
        path: A ``.json``, ``.jsonl``, ``.json.gz``, ``.jsonl.gz`` or ``.parquet`` file.
        report: Where malformed lines and non-object rows are counted. Without one, the first
            such row raises ``ValueError``.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Unsupported file type, an unreadable file (a truncated ``.gz``, a corrupt Parquet file), a
            ``.json`` array that is not valid JSON, or (without ``report``) a bad row.
        ImportError: A Parquet file is read and ``pyarrow`` is missing.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a directory: pass its data files (e.g. {path}/*.jsonl.gz)")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            yield from _iter_parquet(path)
        elif name.endswith((".jsonl", ".jsonl.gz")):
            with _open_binary(path) as lines:
                yield from _iter_json_lines(path, lines, report)
        elif name.endswith((".json", ".json.gz")):
            with _open_binary(path) as stream:
                yield from _iter_json_document(path, stream.read(), report)
        else:
            raise ValueError(f"{path}: unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")
    except (OSError, EOFError, zlib.error) as err:  # a truncated or corrupt .gz, an unreadable file
        raise ValueError(f"{path}: cannot read the file ({err})") from None


def read_records(
    paths: PathLike | Sequence[PathLike],
    parser_for: Callable[[dict], RowParser],
    max_samples: int | None = None,
) -> tuple[list, ParseReport]:
    """Turn the rows of several files into records, skipping and counting bad rows.

    Each file gets its own row parser, chosen by ``parser_for`` from its first row that it accepts (this is where
    format auto-detection happens; rows before that one are skipped as ``"format not recognised"``). A parser
    returns a record or raises :class:`BadRowError`.

    Args:
        paths: One data file or several.
        parser_for: Maps a row to the function ``(row, location) -> record``, or raises ``ValueError``.
        max_samples: Stop after this many records in total (``None``: read everything).

    Returns:
        The records, in file and row order, and the :class:`ParseReport` over all files read.

    Raises:
        ValueError: A file yields no usable row (the message names the file and the top
            reasons), or ``parser_for`` rejects every row of a file (its message for the first row).
    """
    records: list = []
    report = ParseReport()
    for path in _as_path_list(paths):
        if max_samples is not None and len(records) >= max_samples:
            break
        file_report = ParseReport(files=[str(path)])
        parse, detection_error = None, None
        for row, location in iter_rows(path, file_report):
            if parse is None:  # the first row that parser_for accepts decides; rows before it are skipped
                try:
                    parse = parser_for(row)
                except ValueError as err:
                    detection_error = detection_error or f"{path}: {err}"
                    file_report.skip(location, "format not recognised", str(err))
                    continue
            try:
                records.append(parse(row, location))
            except BadRowError as err:
                file_report.skip(location, err.reason, err.detail)
                continue
            file_report.rows_kept += 1
            if max_samples is not None and len(records) >= max_samples:
                break
        if parse is None and detection_error is not None:
            raise ValueError(detection_error)
        if file_report.rows_kept == 0:
            raise ValueError(_no_usable_rows_message(path, file_report))
        report.merge(file_report)
    return records, report


def _as_path_list(paths: PathLike | Sequence[PathLike]) -> list[PathLike]:
    if isinstance(paths, (str, os.PathLike)):
        return [paths]
    if not paths:
        raise ValueError("no data files given")
    return list(paths)


def _no_usable_rows_message(path: Path, file_report: ParseReport) -> str:
    if not file_report.skipped:
        return f"{path}: no usable rows (the file has no rows)"
    return (
        f"{path}: no usable rows ({file_report.rows_skipped} skipped; "
        f"top reasons: {file_report.top_reasons()}; first: {file_report.first_skipped[0]})"
    )


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _bad_row(report: ParseReport | None, location: str, reason: str, detail: str) -> None:
    if report is None:
        raise ValueError(f"{location}: {reason} ({detail})")
    report.skip(location, reason, detail)


def _checked_row(row: Any, location: str, report: ParseReport | None) -> Iterator[tuple[dict, str]]:
    if isinstance(row, dict):
        yield row, location
    else:
        _bad_row(report, location, "row is not a JSON object", type(row).__name__)


def _iter_json_lines(path: Path, lines: Iterator[bytes], report: ParseReport | None) -> Iterator[tuple[dict, str]]:
    for line_number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        location = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
            _bad_row(report, location, "malformed JSON", str(err))
            continue
        yield from _checked_row(row, location, report)


def _iter_json_document(path: Path, data: bytes, report: ParseReport | None) -> Iterator[tuple[dict, str]]:
    data = data.removeprefix(codecs.BOM_UTF8)
    if data.lstrip().startswith(b"["):
        rows = _parse_json_document(path, data)
    else:
        document = _try_parse_json(data)
        if not (isinstance(document, dict) and isinstance(document.get("data"), list)):
            yield from _iter_json_lines(path, data.splitlines(), report)
            return
        rows = document["data"]
    for index, row in enumerate(rows):
        yield from _checked_row(row, f"{path}:[{index}]", report)


def _parse_json_document(path: Path, data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _try_parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _iter_parquet(path: Path) -> Iterator[tuple[dict, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from err
    try:
        parquet = pq.ParquetFile(path)
    except ValueError as err:  # pyarrow's ArrowInvalid
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield row, f"{path}:[{index}]"
            index += 1
