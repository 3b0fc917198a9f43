"""The training set and its report: read -> check -> render the Alpaca prompt -> tokenize with
completion-only labels -> length policy. Runs on the tokenizer alone, so bad data fails before any
model weights load."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .records import MAX_ROWS_NAMED, DataError, read_rows, to_examples
from .tokenize import IGNORE_INDEX, tokenize

ROWS_NAMED_IN_REPORT = 5  # per reason of dropping


@dataclass
class DataReport:
    """What happened to the rows on their way to training; saved with the run."""

    source: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_rows: dict[str, list[str]] = field(default_factory=dict)  # reason -> the first few rows dropped for it
    duplicates: int = 0  # kept examples whose prompt and response both appeared before
    boundary_retokenized: int = 0
    tokens_per_example: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    trained_tokens: int = 0
    validation: dict[str, Any] | None = None  # data/split.py: where the validation examples came from

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.trained_tokens

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        named = self.dropped_rows.setdefault(reason, [])
        if len(named) < ROWS_NAMED_IN_REPORT:
            named.append(where)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_tokens": self.total_tokens}

    def summary(self) -> str:
        dropped = "; ".join(
            f"{n} {why} ({'; '.join(self.dropped_rows.get(why, []))}{'; ...' if n > len(self.dropped_rows.get(why, [])) else ''})"
            for why, n in sorted(self.dropped.items())
        ) or "none"
        t = self.tokens_per_example
        return (
            f"data {self.source}: {self.rows_read} rows read, {self.rows_kept} kept, dropped: {dropped}"
            + (f"; {self.duplicates} duplicates kept" if self.duplicates else "")
            + f"\ntokens per example: mean {t.get('mean', 0):.1f}, median {t.get('median', 0):.0f}, "
            f"max {t.get('max', 0):.0f}; {self.total_tokens:,} tokens in all = "
            f"{self.prompt_tokens:,} prompt (masked) + {self.trained_tokens:,} trained (response + EOS)"
            + self._validation_line()
        )

    def _validation_line(self) -> str:
        v = self.validation
        if not v:
            return "\nvalidation: none (set validation_size or validation_file to watch the loss and the stop metric)"
        seed = f", seed {v['seed']}" if "seed" in v else ""
        return (f"\nvalidation: {v['examples']} examples {v['source']}{seed}; "
                f"{v['also_in_training']} of them also in training; {v['train_examples']} examples to train on")


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
    """The training Dataset (columns input_ids, labels) and the report of how it was made.

    An example longer than max_length is never cut (a cut loses its EOS, and the model would learn
    to run on): 'drop' removes and reports it, 'error' fails naming it."""
    from datasets import Dataset

    rows = read_rows(source, split)
    if max_rows is not None:
        rows = rows[:max_rows]
    report = DataReport(source=source, rows_read=len(rows))
    examples, invalid = to_examples(rows, drop_invalid_rows, source)
    for bad in invalid:
        report.drop(bad.reason, bad.row.where)
    seen = Counter((e["prompt"], e["completion"]) for e in examples)
    report.duplicates = sum(n - 1 for n in seen.values())
    token_rows, report.boundary_retokenized = tokenize(examples, tokenizer)

    kept = []
    too_long = f"longer than max_length={max_length}"
    for example, row in zip(examples, token_rows):
        if max_length is None or len(row["input_ids"]) <= max_length:
            kept.append(row)
        elif overlong_policy == "error":
            overlong = [(e["where"], len(r["input_ids"])) for e, r in zip(examples, token_rows) if len(r["input_ids"]) > max_length]
            shown = ", ".join(f"{where} ({n} tokens)" for where, n in overlong[:MAX_ROWS_NAMED])
            raise DataError(
                f"{len(overlong)} examples are {too_long}: {shown}. "
                "Raise max_length, or set `overlong_policy: drop` to drop and count them."
            )
        else:
            report.drop(too_long, f"{example['where']}: {len(row['input_ids'])} tokens")
    if not kept:
        raise DataError(f"no trainable examples left in {source}: {report.summary()}")

    lengths = [len(r["input_ids"]) for r in kept]
    report.rows_kept = len(kept)
    report.trained_tokens = sum(sum(1 for label in r["labels"] if label != IGNORE_INDEX) for r in kept)
    report.prompt_tokens = sum(lengths) - report.trained_tokens
    report.tokens_per_example = {"mean": statistics.fmean(lengths), "median": statistics.median(lengths), "max": max(lengths)}
    return Dataset.from_list(kept), report


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
            prompt_text, trained_text = tokenizer.decode(ids[:start]), tokenizer.decode(ids[start:])
            record = {"input_ids": ids, "labels": labels, "prompt_text": prompt_text, "trained_text": trained_text}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            shown.append(
                f"===== example {i}: {len(ids)} tokens, {start} prompt (masked), {len(ids) - start} trained "
                f"=====\n{prompt_text}[[{trained_text}]]"
            )
    return "\n".join(shown)
