"""Evaluation prompts: JSON Lines of Alpaca fields or text-to-SQL fields (rendered as training renders
them) or verbatim prompts, with an optional reference answer and, for text-to-SQL prompts, the schema.
Each prompt's file is its group in the report's tables."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import sqlglot
from sqlglot import exp

from ..data.records import read_json_lines
from ..data.template import render_prompt, render_sql_prompt


class PromptFileError(ValueError):
    """The prompt file cannot be used; the message names the line."""


class ContextError(ValueError):
    """The prompts, or --max_new_tokens, do not fit the model's context."""


@dataclass
class EvalPrompt:
    id: str
    prompt: str
    reference: str | None = None
    schema: str | None = None  # a CREATE TABLE: the answer is SQL, checked by running it
    group: str = ""  # the prompt file's name (its stem), made unique among the files read
    line: int | None = None


def read_prompt_files(paths: list[str]) -> list[EvalPrompt]:
    """The prompts of several files, in order, each in its file's group; with more than one file, each id
    says its group."""
    resolved = [Path(path).resolve() for path in paths]
    if twice := sorted({str(path) for path, where in zip(paths, resolved) if resolved.count(where) > 1}):
        raise PromptFileError(f"--prompts names {', '.join(twice)} more than once")
    stems = [Path(path).stem for path in paths]
    groups = [stem if stems.count(stem) == 1 else str(Path(path).with_suffix("")) for path, stem in zip(paths, stems)]
    return [replace(p, id=f"{group}/{p.id}" if len(paths) > 1 else p.id, group=group)
            for path, group in zip(paths, groups) for p in read_prompts(path)]


def schema_problem(schema: str) -> str | None:
    """Why a prompt's schema cannot be built as SQL tables (the SQL check runs answers on them), or None."""
    try:
        statements = sqlglot.parse(schema, read="sqlite")
    except sqlglot.errors.SqlglotError as err:
        return f"the schema is not SQL that sqlglot parses ({str(err).splitlines()[0]})"
    if not any(isinstance(s, exp.Create) and isinstance(s.this, exp.Schema) and s.this.expressions for s in statements):
        return "the schema holds no CREATE TABLE with columns"
    return None


def check_lengths(prompts: list[EvalPrompt], tokenizer, context: int | None, max_new_tokens: int) -> str | None:
    """Refuses prompts as long as the model's context (max_position_embeddings) and a --max_new_tokens beyond
    it; returns a warning, with the numbers, when some answers could run past the context; else None."""
    if not context:
        return None
    lengths = [len(ids) for ids in tokenizer([p.prompt for p in prompts])["input_ids"]]
    over = [(p, n) for p, n in zip(prompts, lengths) if n >= context]
    if over:
        named = ", ".join(f"{p.group} line {p.line} ({p.id}: {n:,} tokens)" for p, n in over[:5])
        raise ContextError(f"{len(over)} prompt(s) fill the model's context of {context:,} tokens "
                           f"(max_position_embeddings) or more: {named}{', ...' if len(over) > 5 else ''}. "
                           "Shorten them or leave them out")
    room = context - max(lengths)  # new tokens that fit after the longest prompt
    if max_new_tokens > context:
        raise ContextError(f"--max_new_tokens {max_new_tokens:,} is beyond the model's context of {context:,} tokens "
                           f"(max_position_embeddings): give at most {room:,} (the context less the longest prompt)")
    past = [n for n in lengths if n + max_new_tokens > context]
    if not past:
        return None
    return (f"warning: {len(past)} of {len(prompts)} prompts plus --max_new_tokens {max_new_tokens:,} exceed the model's "
            f"context of {context:,} tokens (max_position_embeddings): their answers can run past the positions the "
            f"model was trained on; --max_new_tokens {room:,} keeps every answer inside")


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
        wrong_type = [key for key in ("reference", "output", "schema", "input", "answer")
                      if record.get(key) is not None and not isinstance(record[key], str)]
        problems += [f"{where}: `{key}` must be a string" for key in wrong_type]
        schema = record.get("schema")
        if isinstance(schema, str) and (problem := schema_problem(schema)):  # else both models' SQL would fail on it
            problems.append(f"{where}: `{'schema' if 'schema' in row.record else 'context'}`: {problem}")
        reference = record.get("reference", record.get("output"))
        prompts.append(EvalPrompt(str(record.get("id", f"line-{row.line}")), text, reference, record.get("schema"),
                                  line=row.line))
    if problems:
        raise PromptFileError(f"{path}:\n" + "\n".join(f"  {p}" for p in problems))
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts")
    return prompts
