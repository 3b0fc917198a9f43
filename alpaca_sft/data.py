"""Alpaca records in, supervised token rows out.

read -> validate -> render the Alpaca prompt -> tokenize with completion-only labels -> length policy.
Everything here runs on the tokenizer alone, so bad data fails before any model weights load.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .template import render_prompt

IGNORE_INDEX = -100  # labels at this value carry no loss (PyTorch's cross-entropy default)
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
MAX_ROWS_NAMED = 200  # an error names at most this many bad rows, then counts the rest


class DataError(ValueError):
    """The data cannot be trained on as it is; the message says what to change."""


@dataclass
class DataReport:
    """What happened to the rows on their way to training; saved with the run."""

    source: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    boundary_retokenized: int = 0
    tokens_per_example: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    trained_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.trained_tokens

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_tokens": self.total_tokens}

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        t = self.tokens_per_example
        return (
            f"data {self.source}: {self.rows_read} rows read, {self.rows_kept} kept, dropped: {dropped}\n"
            f"tokens per example: mean {t.get('mean', 0):.1f}, median {t.get('median', 0):.0f}, "
            f"max {t.get('max', 0):.0f}; {self.total_tokens:,} tokens in all = "
            f"{self.prompt_tokens:,} prompt (masked) + {self.trained_tokens:,} trained (response + EOS)"
        )


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


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_rows(source: str, split: str = "train") -> list[Row]:
    """Rows from a local .json/.jsonl/.parquet/.csv file, or from a Hub dataset id (or a local
    folder laid out like one), through `datasets.load_dataset`.

    JSON is parsed here rather than by `datasets` so that an unreadable line or a value of the
    wrong type is reported against its line instead of failing the whole Arrow conversion.
    """
    path = Path(source)
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise DataError(f"data file {source} does not exist")
        if path.suffix in (".json", ".jsonl"):
            return _read_json(path)
        return _read_with_datasets(path.suffix.lstrip("."), data_files=str(path), split="train")
    if path.is_file():
        raise DataError(f"unsupported data file {source}: use one of {', '.join(LOCAL_SUFFIXES)}")
    return _read_with_datasets(source, split=split)


def _read_with_datasets(name: str, **kwargs: Any) -> list[Row]:
    import datasets

    if name == "csv":
        kwargs["keep_default_na"] = False  # an empty `input` cell is "", not NaN
    try:
        table = datasets.load_dataset(name, **kwargs)
    except Exception as err:  # the Hub, a parser or the network: say which source failed
        raise DataError(f"could not load dataset {kwargs.get('data_files', name)!r}: {err}") from err
    return [Row(index=i, record=record) for i, record in enumerate(table)]


def _read_json(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON: {err}") from err
        return [Row(index=i, record=r) for i, r in enumerate(records)]
    rows, index = [], 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(Row(index=index, record=json.loads(line), line=line_number))
        except json.JSONDecodeError as err:
            rows.append(Row(index=index, line=line_number, unreadable=f"not valid JSON ({err.msg})"))
        index += 1
    return rows


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def problem_with(row: Row) -> tuple[str, str] | None:
    """(reason, detail) for a row that cannot be trained on, or None. Reasons are short and
    categorical so that dropped rows can be counted by them."""
    if row.unreadable:
        return "unreadable line", row.unreadable
    record = row.record
    if not isinstance(record, dict):
        return "not an object", f"expected an object with instruction/input/output, got {type(record).__name__}"
    for key in ("instruction", "output"):
        if key not in record or record[key] is None:
            return f"missing {key}", f"no `{key}` field"
        if not isinstance(record[key], str):
            return f"{key} not a string", f"`{key}` is {type(record[key]).__name__}, not a string"
        if not record[key].strip():
            return f"empty {key}", f"`{key}` is empty"
    if record.get("input") is not None and not isinstance(record["input"], str):
        return "input not a string", f"`input` is {type(record['input']).__name__}, not a string"
    return None


def validate(rows: list[Row], drop_invalid: bool, report: DataReport, source: str) -> list[dict[str, str]]:
    """Prompt/completion pairs for the valid rows. Invalid rows raise one DataError naming each of
    them, unless drop_invalid, when they are counted by reason in the report."""
    examples, bad = [], []
    for row in rows:
        problem = problem_with(row)
        if problem:
            bad.append((row, problem))
            continue
        record = row.record
        examples.append(
            {"prompt": render_prompt(record["instruction"], record.get("input") or ""), "completion": record["output"]}
        )
    if bad and not drop_invalid:
        named = [f"  {row.where}: {detail}" for row, (_, detail) in bad[:MAX_ROWS_NAMED]]
        if len(bad) > MAX_ROWS_NAMED:
            named.append(f"  ... and {len(bad) - MAX_ROWS_NAMED} more")
        counts = Counter(reason for _, (reason, _) in bad)
        raise DataError(
            f"{len(bad)} of {len(rows)} rows in {source} cannot be trained on "
            f"({', '.join(f'{n} {r}' for r, n in sorted(counts.items()))}):\n"
            + "\n".join(named)
            + "\nFix these rows, or set `drop_invalid_rows: true` to drop them and count them."
        )
    for _, (reason, _) in bad:
        report.dropped[reason] = report.dropped.get(reason, 0) + 1
    return examples


# --------------------------------------------------------------------------------------------
# Tokenization with completion-only labels
# --------------------------------------------------------------------------------------------


def _encode(tokenizer, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    # split_special_tokens: a response that says "</s>" in its text must not become an EOS token.
    return tokenizer(texts, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"]


def _completion_after_newline(tokenizer, completion: str) -> list[int] | None:
    """The completion's tokens as they follow a newline, found by encoding "\\n" + completion and
    removing the tokens of "\\n" alone. Used when prompt+completion does not split cleanly at the
    prompt's end; None if even that does not split."""
    anchor = _encode(tokenizer, ["\n"], add_special_tokens=False)[0]
    ids = _encode(tokenizer, ["\n" + completion], add_special_tokens=False)[0]
    return ids[len(anchor) :] if ids[: len(anchor)] == anchor else None


def tokenize(examples: list[dict[str, str]], tokenizer, report: DataReport) -> list[dict[str, list[int]]]:
    """input_ids = prompt + response + EOS; labels = -100 over the prompt, the ids elsewhere.

    The prompt's tokens are the ones an inference call on the prompt alone sees; the response's
    are taken from the joint tokenization whenever the prompt's tokens are its exact prefix (the
    sentencepiece boundary problem of trl#980), and re-derived otherwise, so the trained span
    always decodes to exactly the response.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token: the model could never learn to stop")
    eos = tokenizer.eos_token_id
    rows = []
    for start in range(0, len(examples), 1024):
        batch = examples[start : start + 1024]
        prompts = _encode(tokenizer, [e["prompt"] for e in batch])
        fulls = _encode(tokenizer, [e["prompt"] + e["completion"] for e in batch])
        for offset, (example, prompt_ids, full_ids) in enumerate(zip(batch, prompts, fulls)):
            if full_ids[: len(prompt_ids)] == prompt_ids:
                completion_ids = full_ids[len(prompt_ids) :]
            else:
                completion_ids = _completion_after_newline(tokenizer, example["completion"])
                report.boundary_retokenized += 1
                if not completion_ids or tokenizer.decode(prompt_ids + completion_ids) != tokenizer.decode(full_ids):
                    raise DataError(
                        f"example {start + offset}: its response cannot be tokenized apart from its prompt; "
                        "the prompt template must end at a token boundary (end it with a newline)"
                    )
            rows.append(
                {
                    "input_ids": prompt_ids + completion_ids + [eos],
                    "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [eos],
                }
            )
    return rows


def apply_length_policy(rows: list[dict], max_length: int | None, policy: str, report: DataReport) -> list[dict]:
    """Never cut an example (cutting loses its EOS, and the model would learn to run on):
    'drop' removes and counts examples longer than max_length, 'error' fails naming them."""
    if max_length is None:
        return rows
    too_long = [i for i, r in enumerate(rows) if len(r["input_ids"]) > max_length]
    if not too_long:
        return rows
    if policy == "error":
        shown = ", ".join(f"{i} ({len(rows[i]['input_ids'])} tokens)" for i in too_long[:MAX_ROWS_NAMED])
        raise DataError(
            f"{len(too_long)} examples are longer than max_length={max_length}: {shown}. "
            "Raise max_length, or set `overlong_policy: drop` to drop and count them."
        )
    report.dropped[f"longer than max_length={max_length}"] = len(too_long)
    skip = set(too_long)
    return [r for i, r in enumerate(rows) if i not in skip]


def measure(rows: list[dict], report: DataReport) -> None:
    lengths = [len(r["input_ids"]) for r in rows]
    trained = sum(sum(1 for label in r["labels"] if label != IGNORE_INDEX) for r in rows)
    report.rows_kept = len(rows)
    report.trained_tokens = trained
    report.prompt_tokens = sum(lengths) - trained
    if lengths:
        report.tokens_per_example = {
            "mean": statistics.fmean(lengths),
            "median": statistics.median(lengths),
            "max": max(lengths),
        }


def build_dataset(
    source: str,
    tokenizer,
    *,
    split: str = "train",
    max_length: int | None = None,
    drop_invalid_rows: bool = False,
    overlong_policy: str = "drop",
    max_rows: int | None = None,
):
    """The training Dataset (columns input_ids, labels) and the report of how it was made."""
    from datasets import Dataset

    rows = read_rows(source, split)
    if max_rows is not None:
        rows = rows[:max_rows]
    report = DataReport(source=source, rows_read=len(rows))
    examples = validate(rows, drop_invalid_rows, report, source)
    token_rows = apply_length_policy(tokenize(examples, tokenizer, report), max_length, overlong_policy, report)
    if not token_rows:
        raise DataError(f"no trainable examples left in {source}: {report.summary()}")
    measure(token_rows, report)
    return Dataset.from_list(token_rows), report


# --------------------------------------------------------------------------------------------
# Preview
# --------------------------------------------------------------------------------------------


def preview(rows: Iterable[dict], tokenizer, n: int, path: Path) -> str:
    """The first n examples as text with the trained span marked [[ ]], and as JSON lines at path."""
    shown = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for i, row in enumerate(rows):
            if i == n:
                break
            ids, labels = row["input_ids"], row["labels"]
            start = next(j for j, label in enumerate(labels) if label != IGNORE_INDEX)
            prompt_text = tokenizer.decode(ids[:start])
            trained_text = tokenizer.decode(ids[start:])
            out.write(
                json.dumps(
                    {
                        "input_ids": ids,
                        "labels": labels,
                        "prompt_text": prompt_text,
                        "trained_text": trained_text,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
            shown.append(
                f"===== example {i}: {len(ids)} tokens, {start} prompt (masked), {len(ids) - start} trained "
                f"=====\n{prompt_text}[[{trained_text}]]"
            )
    return "\n".join(shown)
