"""The validation split: examples held out of training to watch the model learn to answer and stop.

Held-out examples are chosen by content, not by row: every copy of a chosen example goes to
validation, so that a data set with duplicates (Alpaca has some) never shows the model, in training,
an example it is then validated on. A separate validation file is accepted instead; its overlap with
the training examples, which nothing here removes, is counted and reported.
"""

from __future__ import annotations

import random
from collections import defaultdict

from .records import DataError


def _contents(dataset) -> list[tuple[int, ...]]:
    return [tuple(ids) for ids in dataset["input_ids"]]  # identical token rows: the same prompt and response


def held_out_count(size: float, examples: int) -> int:
    """`size` below 1 is a fraction of the examples (at least one), from 1 up a count."""
    return max(1, round(size * examples)) if size < 1 else int(size)


def hold_out(dataset, size: float, seed: int):
    """(train, validation) Datasets: about `size` examples held out, chosen by `seed`, whole groups
    of identical examples at a time; training keeps at least one example."""
    groups = defaultdict(list)
    for index, content in enumerate(_contents(dataset)):
        groups[content].append(index)
    wanted = held_out_count(size, len(dataset))
    if wanted >= len(dataset):
        raise DataError(f"validation_size={size:g} would hold out {wanted} of the {len(dataset)} trainable examples, "
                        "leaving none to train on: lower it")
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    held = []
    for indices in order:
        if len(held) >= wanted:
            break
        held += indices
    held_set = set(held)
    train = [i for i in range(len(dataset)) if i not in held_set]
    if not train:
        raise DataError(f"validation_size={size:g}: every example is a copy of a held-out one, none left to train on")
    return dataset.select(train), dataset.select(sorted(held))


def overlap(train, validation) -> int:
    """How many validation examples also appear, identical, among the training examples."""
    seen = set(_contents(train))
    return sum(content in seen for content in _contents(validation))


def split_validation(dataset, report, *, size: float, seed: int, file: str | None, build):
    """(train, validation or None) as the settings ask, and report.validation saying what was done.
    `build(source)` makes a (Dataset, DataReport) the way the training data was made."""
    if file:
        validation, file_report = build(file)
        report.validation = {"source": file, "examples": len(validation), "rows_read": file_report.rows_read,
                             "dropped": file_report.dropped, "also_in_training": overlap(dataset, validation),
                             "train_examples": len(dataset)}
        return dataset, validation
    if not size:
        return dataset, None
    train, validation = hold_out(dataset, size, seed)
    source = report.source + (f" and {report.mix['source']}" if report.mix else "")
    report.validation = {"source": f"held out of {source}", "examples": len(validation), "seed": seed,
                         "also_in_training": overlap(train, validation), "train_examples": len(train)}
    return train, validation
