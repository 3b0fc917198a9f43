"""The training set and its report: read -> check -> render the prompt -> tokenize with completion-only
labels -> length policy -> mix in a second data set -> hold out the validation examples. Runs on the
tokenizer alone, so bad data fails before any model weights load."""

from __future__ import annotations

import hashlib
import json
import random
import statistics
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .records import MAX_ROWS_NAMED, DataError, read_rows, to_examples
from .split import split_validation
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
    mix: dict[str, Any] | None = None  # mix_in: the second data set, and the share of training examples it makes up
    fingerprint: str | None = None  # of the examples trained on, in order: a resume checks it (train/checkpoints.py)
    validation_fingerprint: str | None = None  # of the validation examples: a resume checks it too
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
            + self._mix_line()
            + self._validation_line()
        )

    def _mix_line(self) -> str:
        m = self.mix
        if not m:
            return ""
        return (f"\nmixed in: {m['examples']} of the {m['examples_available']} examples of {m['source']} "
                f"({m['rows_read']} rows read), {m['share']:.1%} of the training examples (asked: {m['share_asked']:.1%}); "
                f"{m['total_tokens']:,} of the tokens above")

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
    report.rows_kept = len(kept)
    _count_tokens(report, [r["labels"] for r in kept])
    return Dataset.from_list(kept), report


def _count_tokens(report: DataReport, labels: list[list[int]]) -> None:
    """The report's token counts over every example trained on (each example's labels: one per token)."""
    lengths = [len(example) for example in labels]
    report.trained_tokens = sum(sum(1 for label in example if label != IGNORE_INDEX) for example in labels)
    report.prompt_tokens = sum(lengths) - report.trained_tokens
    report.tokens_per_example = {"mean": statistics.fmean(lengths), "median": statistics.median(lengths), "max": max(lengths)}


def mix_in(dataset, report: DataReport, mix, mix_report: DataReport, share: float, seed: int):
    """`dataset` with examples of `mix` drawn (by `seed`, without repeats) to make up `share` of the
    result, or all of them where there are fewer; the order is shuffled so that the two sets are
    interleaved in training. The report then counts the tokens of both, and says the share reached."""
    from datasets import concatenate_datasets

    wanted = round(share / (1 - share) * len(dataset))
    rng = random.Random(seed)
    drawn = mix.select(sorted(rng.sample(range(len(mix)), min(wanted, len(mix)))))
    mixed = concatenate_datasets([dataset, drawn])
    mixed = mixed.select(rng.sample(range(len(mixed)), len(mixed)))
    mix_tokens = sum(len(ids) for ids in drawn["input_ids"])
    report.mix = {"source": mix_report.source, "rows_read": mix_report.rows_read, "examples_available": len(mix),
                  "examples": len(drawn), "share_asked": share, "share": len(drawn) / len(mixed),
                  "dropped": mix_report.dropped, "total_tokens": mix_tokens, "seed": seed}
    _count_tokens(report, mixed["labels"])
    return mixed, report


def build_training_data(script_args, tokenizer, max_length: int | None, seed: int = 42):
    """(train, validation or None, report) as the settings say: dataset_name, with mix_dataset_name mixed in,
    and the validation examples held out of the result (or read from validation_file)."""
    def build(source, split="train", max_rows=None):
        return build_dataset(source, tokenizer, split=split, max_length=max_length, max_rows=max_rows,
                             drop_invalid_rows=script_args.drop_invalid_rows, overlong_policy=script_args.overlong_policy)

    dataset, report = build(script_args.dataset_name, script_args.dataset_split, script_args.max_train_rows)
    if script_args.mix_dataset_name:
        mix, mix_report = build(script_args.mix_dataset_name)
        dataset, report = mix_in(dataset, report, mix, mix_report, script_args.mix_share, seed)
    dataset, validation = split_validation(dataset, report, size=script_args.validation_size,
                                           seed=script_args.validation_seed, file=script_args.validation_file, build=build)
    report.fingerprint = fingerprint(dataset)
    report.validation_fingerprint = fingerprint(validation) if validation is not None else None
    return dataset, validation, report


def fingerprint(dataset) -> str:
    """A short hash of every example's tokens and labels, in order."""
    digest = hashlib.sha256()
    for ids, labels in zip(dataset["input_ids"], dataset["labels"]):
        digest.update(array("i", ids).tobytes() + b"|" + array("i", labels).tobytes() + b";")
    return digest.hexdigest()[:16]


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
