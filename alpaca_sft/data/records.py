"""Reading records and checking them: a local .json/.jsonl/.parquet/.csv file or a Hub dataset in,
prompt/completion pairs out, every unusable row named by row and line.

Two layouts of row are read: Alpaca's instruction/input/output, rendered with the Alpaca template, and
text-to-SQL's question/context/answer (b-mc2/sql-create-context), rendered in the showcase's layout.

Problems of a whole file (not found, a URL, a JSON object where a list belongs, a missing column)
are reported once, as such; problems of a row name the row. A UTF-8 byte-order mark is accepted in
every format, and a line that is not UTF-8 is a row problem like any other.

A file given by mistake may hold anything (a private key, a password file named .csv): messages quote
none of a file's text beyond the field names this pipeline reads, and a local file leaves no copy
behind in the datasets cache (see _read_with_datasets).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..disk import room_left, write_failure
from ..hub import hub_problem, looks_local
from .template import render_prompt, render_sql_prompt

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
REQUIRED_FIELDS = ("instruction", "output")
SQL_FIELDS = ("question", "context", "answer")
KNOWN_FIELDS = ("instruction", "input", "output", *SQL_FIELDS)
MAX_ROWS_NAMED = 200  # an error names at most this many bad rows, then counts the rest
BOM = "\ufeff"


class DataError(ValueError):
    """The data cannot be trained on as it is; the message says what to change."""


@dataclass
class Row:
    """One source row: where it came from, and either its record or why it could not be read."""

    index: int
    record: Any = None
    line: int | None = None
    unreadable: str | None = None

    @property
    def where(self) -> str:
        return f"row {self.index}" + (f" (line {self.line})" if self.line is not None else "")


@dataclass
class Invalid:
    row: Row
    reason: str  # short and categorical, so that dropped rows can be counted by it
    detail: str


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_rows(source: str, split: str = "train") -> list[Row]:
    """Rows from a local .json/.jsonl/.parquet/.csv file, or from a Hub dataset id (or a local
    folder laid out like one) through `datasets.load_dataset`.

    JSON is parsed here rather than by `datasets`, so that an unreadable line or a value of the
    wrong type is reported against its line instead of failing the whole Arrow conversion."""
    if source.startswith(("http://", "https://")):
        raise DataError(f"dataset_name={source}: URLs are not read; download the file and give its path")
    path = Path(source)
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise DataError(f"data file {source} does not exist")
        _refuse_compressed(path)
        if path.suffix == ".json":
            return _read_json(path)
        if path.suffix == ".jsonl":
            return read_json_lines(path)
        return _read_table(path)
    if path.is_file():
        raise DataError(f"unsupported data file {source}: use one of {', '.join(LOCAL_SUFFIXES)}")
    return _read_with_datasets(source, split=split)


# What compressed or archived files start with, whatever their name says.
COMPRESSED = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _refuse_compressed(path: Path) -> None:
    with path.open("rb") as file:
        start = file.read(6)
    kind = next((k for magic, k in COMPRESSED.items() if start.startswith(magic)), None)
    if kind and path.suffix != ".parquet":
        raise DataError(f"{path} is {kind}-compressed, whatever its name says: decompress it first "
                        f"(a {path.suffix} file is read as text)")


def read_json_lines(path: Path) -> list[Row]:
    """One Row per non-blank line, numbered from 1; a line that is not UTF-8 or not JSON is a Row
    that says so. Shared by the training data and the evaluation prompts."""
    rows = []
    for number, raw in enumerate(Path(path).read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            rows.append(Row(len(rows), line=number, unreadable=f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"))
            continue
        line = line.removeprefix(BOM) if number == 1 else line
        if not line.strip():
            continue
        try:
            rows.append(Row(len(rows), record=json.loads(line), line=number))
        except json.JSONDecodeError as err:
            rows.append(Row(len(rows), line=number, unreadable=f"not valid JSON ({err.msg} at column {err.colno})"))
        except RecursionError:
            rows.append(Row(len(rows), line=number, unreadable="nested too deeply to be a record"))
    return rows


def _read_json(path: Path) -> list[Row]:
    """A .json file: one JSON array of records (Alpaca's alpaca_data.json), or JSON Lines."""
    try:
        text = path.read_bytes().decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError:
        return read_json_lines(path)  # which names the line that is not UTF-8
    try:
        whole = json.loads(text)
    except RecursionError:
        raise DataError(f"{path} is nested too deeply to be a list of records") from None
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):
            raise DataError(f"{path} is not valid JSON: {err}") from err
        return read_json_lines(path)  # several JSON values, one per line
    if isinstance(whole, dict):
        raise DataError(
            f"{path} holds one JSON object (keys: {_field_names(whole)}), not a list of records: "
            "write the records as a JSON array, or one per line in a .jsonl file"
        )
    if not isinstance(whole, list):
        raise DataError(f"{path} holds a JSON {type(whole).__name__}, not a list of records")
    return [Row(index=i, record=record) for i, record in enumerate(whole)]


def _read_table(path: Path) -> list[Row]:
    rows = _read_with_datasets(path.suffix.lstrip("."), data_files=str(path), split="train")
    columns = set(rows[0].record) if rows else set()
    missing = [f for f in REQUIRED_FIELDS if f not in columns]
    if rows and missing and not set(SQL_FIELDS) <= columns:
        raise DataError(
            f"{path} has no {' or '.join(f'`{m}`' for m in missing)} column (its columns: {_field_names(columns)}); "
            "the fields are instruction, input (optional) and output, or question, context and answer"
        )
    return rows


def _field_names(names) -> str:
    """A header's or an object's names as a message may quote them: the fields this pipeline reads by name,
    every other name counted (it is the file's text, which may be anyone's: the first line of a password file)."""
    known = sorted(n for n in names if n in KNOWN_FIELDS)
    others = len(names) - len(known)
    return ", ".join(known + ([f"{others} other{'s' * (others > 1)}"] if others else [])) or "none"


def _read_with_datasets(name: str, **kwargs: Any) -> list[Row]:
    """A Hub dataset through the datasets cache; a local file or folder through a private cache of its own,
    removed once read: datasets 5.2 writes the rows (Arrow) and the column names (dataset_info.json) under
    its cache with the process's umask, readable by others where the source may not have been."""
    import datasets

    if name == "csv":
        kwargs["keep_default_na"] = False  # an empty `input` cell is "", not NaN
        kwargs["encoding"] = "utf-8-sig"  # a byte-order mark is not part of the first column's name
    source = kwargs.get("data_files", name)
    private = contextlib.nullcontext()  # cache_dir None: datasets' own cache
    if "data_files" in kwargs or Path(name).is_dir():
        Path(datasets.config.HF_DATASETS_CACHE).mkdir(parents=True, exist_ok=True)
        private = tempfile.TemporaryDirectory(dir=datasets.config.HF_DATASETS_CACHE, prefix="local-read-")  # mode 0700
    with private as cache_dir:
        try:
            table = datasets.load_dataset(name, cache_dir=cache_dir, **kwargs)
        except Exception as err:  # the Hub, a parser, the network or the cache's disk: say which source failed
            if failure := write_failure(err):  # datasets removes the cache it did not finish
                cache = datasets.config.HF_DATASETS_CACHE
                raise DataError(f"{failure} while datasets wrote its cache of {source!r} in {cache} ({room_left(cache)}); "
                                "nothing was trained. Free space there, or point the cache at a disk with room "
                                "(HF_DATASETS_CACHE=/path/with/room), and run the same command again") from None
            raise DataError(f"could not load dataset {source!r}: {err}") from err
        return [Row(index=i, record=record) for i, record in enumerate(table)]


def dataset_problem(name: str) -> str | None:
    """For a Hub dataset id (local files are checked by the reader), in seconds: None if it can be had."""
    if Path(name).exists() or Path(name).suffix or name.startswith(("http://", "https://")):
        return None  # a local file or folder, a URL: the reader says what is wrong with it
    if looks_local(name):
        return f"dataset folder {name} does not exist"
    return hub_problem(name, "dataset")


# --------------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------------


def is_sql_row(record: dict) -> bool:
    """A text-to-SQL row (question/context/answer) rather than an Alpaca one."""
    return "instruction" not in record and "question" in record


def problem_with(row: Row) -> tuple[str, str] | None:
    """(reason, detail) for a row that cannot be trained on, or None."""
    if row.unreadable:
        return "unreadable line", row.unreadable
    record = row.record
    if not isinstance(record, dict):
        return "not an object", f"expected an object with instruction/input/output, got {type(record).__name__}"
    for key in SQL_FIELDS if is_sql_row(record) else REQUIRED_FIELDS:
        if key not in record or record[key] is None:
            return f"missing {key}", f"no `{key}` field"
        if not isinstance(record[key], str):
            return f"{key} not a string", f"`{key}` is {type(record[key]).__name__}, not a string"
        if not record[key].strip():
            return f"empty {key}", f"`{key}` is empty"
    if record.get("input") is not None and not isinstance(record["input"], str):
        return "input not a string", f"`input` is {type(record['input']).__name__}, not a string"
    return None


def render(record: dict) -> dict[str, str]:
    """A valid row as the prompt the model sees and the completion it learns."""
    if is_sql_row(record):
        return {"prompt": render_sql_prompt(record["question"], record["context"]), "completion": record["answer"]}
    return {"prompt": render_prompt(record["instruction"], record.get("input") or ""), "completion": record["output"]}


def to_examples(rows: list[Row], drop_invalid: bool, source: str) -> tuple[list[dict[str, str]], list[Invalid]]:
    """Prompt/completion pairs of the valid rows (with where each came from), and the invalid rows.
    Unless drop_invalid, any invalid row raises one DataError naming each of them."""
    examples, invalid = [], []
    for row in rows:
        problem = problem_with(row)
        if problem:
            invalid.append(Invalid(row, *problem))
            continue
        examples.append({**render(row.record), "where": row.where})
    if invalid and not drop_invalid:
        named = [f"  {bad.row.where}: {bad.detail}" for bad in invalid[:MAX_ROWS_NAMED]]
        if len(invalid) > MAX_ROWS_NAMED:
            named.append(f"  ... and {len(invalid) - MAX_ROWS_NAMED} more")
        counts = Counter(bad.reason for bad in invalid)
        raise DataError(
            f"{len(invalid)} of {len(rows)} rows in {source} cannot be trained on "
            f"({', '.join(f'{n} {r}' for r, n in sorted(counts.items()))}):\n"
            + "\n".join(named)
            + "\nFix these rows, or set `drop_invalid_rows: true` to drop them and count them."
        )
    return examples, invalid
