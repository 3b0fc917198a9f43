"""Evaluation prompts: JSON Lines of Alpaca fields or text-to-SQL fields (rendered as training renders
them) or verbatim prompts, with an optional reference answer and, for text-to-SQL prompts, the schema."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.records import read_json_lines
from ..data.template import render_prompt, render_sql_prompt


class PromptFileError(ValueError):
    """The prompt file cannot be used; the message names the line."""


@dataclass
class EvalPrompt:
    id: str
    prompt: str
    reference: str | None = None
    schema: str | None = None  # a CREATE TABLE: the answer is SQL, checked by running it


def read_prompt_files(paths: list[str]) -> list[EvalPrompt]:
    """The prompts of several files, in order; with more than one file, each id says its file."""
    if len(paths) == 1:
        return read_prompts(paths[0])
    return [EvalPrompt(f"{Path(path).stem}/{p.id}", p.prompt, p.reference, p.schema)
            for path in paths for p in read_prompts(path)]


def read_prompts(path: str | Path) -> list[EvalPrompt]:
    """Rows with `instruction` (and optional `input`) are rendered with the training template, rows with
    `question` and `context` (text-to-SQL: `answer` is the reference, `context` the schema) in the showcase's
    layout, and rows with `prompt` are used as they are. Optional: `id`, `reference` (an Alpaca row's
    `output` serves as one, so a training file can be evaluated as it is), `schema` (makes it a SQL row)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    prompts, problems = [], []
    for row in read_json_lines(path):
        where = f"line {row.line}"
        record = row.record
        if row.unreadable:
            problems.append(f"{where}: {row.unreadable}")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where}: expected an object")
            continue
        if isinstance(record.get("prompt"), str) and record["prompt"].strip():
            text = record["prompt"]
        elif isinstance(record.get("instruction"), str) and record["instruction"].strip():
            text = render_prompt(record["instruction"], record.get("input") or "")
        elif all(isinstance(record.get(k), str) and record[k].strip() for k in ("question", "context")):
            text = render_sql_prompt(record["question"], record["context"])
            record = {"schema": record["context"], "reference": record.get("answer"), **record}
        else:
            problems.append(f"{where}: needs a non-empty `prompt`, `instruction`, or `question` and `context`")
            continue
        for key in ("reference", "output", "schema", "input", "answer"):
            if record.get(key) is not None and not isinstance(record[key], str):
                problems.append(f"{where}: `{key}` must be a string")
        reference = record.get("reference", record.get("output"))
        prompts.append(EvalPrompt(str(record.get("id", f"line-{row.line}")), text, reference, record.get("schema")))
    if problems:
        raise PromptFileError(f"{path}:\n" + "\n".join(f"  {p}" for p in problems))
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts")
    return prompts
