"""Evaluation prompts, batched greedy generation, and the numbers that compare two models."""

from __future__ import annotations

import json
import re
import statistics
import string
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .sql_check import check_sql, normalize_sql
from .template import render_prompt


class PromptFileError(ValueError):
    """The prompt file cannot be used; the message names the line."""


@dataclass
class EvalPrompt:
    id: str
    prompt: str
    reference: str | None = None
    schema: str | None = None  # a CREATE TABLE: the answer is SQL, checked by running it


@dataclass
class Generation:
    text: str
    stop: str  # "eos" or "length"
    new_tokens: int
    seconds: float  # the batch's wall time, shared evenly by its prompts
    exact_match: bool | None = None
    sql: dict | None = field(default=None)


def read_prompts(path: str | Path) -> list[EvalPrompt]:
    """Rows with `instruction` (and optional `input`) are rendered with the training template; rows
    with `prompt` are used as they are. Optional: `id`, `reference` (an Alpaca row's `output` serves
    as one, so a training file can be evaluated as it is), `schema` (makes it a SQL row)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    prompts, problems = [], []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"line {line_number}: not valid JSON ({err.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"line {line_number}: expected an object")
            continue
        if isinstance(row.get("prompt"), str) and row["prompt"].strip():
            text = row["prompt"]
        elif isinstance(row.get("instruction"), str) and row["instruction"].strip():
            text = render_prompt(row["instruction"], row.get("input") or "")
        else:
            problems.append(f"line {line_number}: needs a non-empty `prompt` or `instruction`")
            continue
        reference = row.get("reference", row.get("output"))
        for key in ("reference", "output", "schema", "input"):
            if row.get(key) is not None and not isinstance(row[key], str):
                problems.append(f"line {line_number}: `{key}` must be a string")
        prompts.append(
            EvalPrompt(str(row.get("id", f"line-{line_number}")), text, reference, row.get("schema"))
        )
    if problems:
        raise PromptFileError(f"{path}:\n" + "\n".join(f"  {p}" for p in problems))
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts")
    return prompts


def generate(model, tokenizer, prompts: list[EvalPrompt], max_new_tokens: int, batch_size: int) -> list[Generation]:
    """Greedy, batched, left-padded (a right-padded batch would generate after its pads)."""
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        inputs = tokenizer([p.prompt for p in batch], return_tensors="pt", padding=True).to(device)
        began = time.perf_counter()
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - began) / len(batch)
        for row in output[:, inputs["input_ids"].shape[1] :].tolist():
            stopped = eos in row
            kept = row[: row.index(eos)] if stopped else row
            results.append(
                Generation(tokenizer.decode(kept, skip_special_tokens=True), "eos" if stopped else "length",
                           len(kept) + int(stopped), seconds)
            )
    return results


def normalize_text(text: str) -> str:
    text = text.strip().lower().rstrip(string.punctuation + " ")
    return re.sub(r"\s+", " ", text)


def score(prompts: list[EvalPrompt], generations: list[Generation]) -> dict:
    """Per-model numbers: EOS share, mean new tokens, exact match, SQL execution and result match."""
    for prompt, gen in zip(prompts, generations):
        if prompt.schema is not None:
            result = check_sql(gen.text, prompt.schema, prompt.reference)
            gen.sql = asdict(result)
            if prompt.reference is not None:
                gen.exact_match = normalize_sql(gen.text) == normalize_sql(prompt.reference)
        elif prompt.reference is not None:
            gen.exact_match = normalize_text(gen.text) == normalize_text(prompt.reference)
    with_reference = [g.exact_match for g in generations if g.exact_match is not None]
    sql = [g.sql for g in generations if g.sql is not None]
    sql_with_reference = [s["matches_reference"] for s in sql if s["matches_reference"] is not None]
    return {
        "prompts": len(generations),
        "stopped_by_eos": sum(g.stop == "eos" for g in generations) / len(generations),
        "mean_new_tokens": statistics.fmean(g.new_tokens for g in generations),
        "exact_match": statistics.fmean(with_reference) if with_reference else None,
        "sql_prompts": len(sql),
        "sql_executes": statistics.fmean(s["executes"] for s in sql) if sql else None,
        "sql_result_match": statistics.fmean(sql_with_reference) if sql_with_reference else None,
        "seconds_per_prompt": statistics.fmean(g.seconds for g in generations),
    }


METRICS = [
    ("stopped_by_eos", "answers that stop by EOS", "{:.0%}"),
    ("mean_new_tokens", "mean new tokens", "{:.1f}"),
    ("exact_match", "exact match (normalized)", "{:.0%}"),
    ("sql_executes", "SQL runs on the schema", "{:.0%}"),
    ("sql_result_match", "SQL result = reference's", "{:.0%}"),
    ("seconds_per_prompt", "seconds per prompt", "{:.2f}"),
]


def _fmt(value, pattern):
    return "n/a" if value is None else pattern.format(value)


def summary_table(scores: dict[str, dict]) -> str:
    names = list(scores)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label, pattern in METRICS:
        lines.append(f"| {label} | " + " | ".join(_fmt(scores[n][key], pattern) for n in names) + " |")
    return "\n".join(lines)


def _cell(text: str, width: int) -> str:
    text = text.replace("\n", "⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def side_by_side(prompts, generations: dict[str, list[Generation]], width: int = 48) -> str:
    names = list(generations)
    lines = []
    for i, prompt in enumerate(prompts):
        lines.append(f"[{prompt.id}]" + (f"  reference: {_cell(prompt.reference, 60)}" if prompt.reference else ""))
        for name in names:
            g = generations[name][i]
            mark = {True: "=", False: "≠", None: " "}[g.exact_match]
            lines.append(f"  {name:>6} {mark} {g.stop:>6} {g.new_tokens:>4} tok  {_cell(g.text, width)}")
    return "\n".join(lines)


def write_report(folder: Path, prompts, generations: dict[str, list[Generation]], scores: dict, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": meta,
        "scores": scores,
        "prompts": [
            {**asdict(p), **{name: asdict(generations[name][i]) for name in generations}} for i, p in enumerate(prompts)
        ],
    }
    (folder / "comparison.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    sections = [
        "# Base vs tuned: greedy generations",
        "\n".join(f"- {k}: `{v}`" for k, v in meta.items()),
        summary_table(scores),
    ]
    for i, prompt in enumerate(prompts):
        block = [f"## {prompt.id}", "```text\n" + prompt.prompt + "\n```"]
        if prompt.reference:
            block.append(f"Reference: `{prompt.reference}`")
        for name in generations:
            g = generations[name][i]
            extra = f", exact match: {g.exact_match}" if g.exact_match is not None else ""
            if g.sql:
                extra += f", SQL runs: {g.sql['executes']}, result matches: {g.sql['matches_reference']}"
            block.append(f"**{name}** (stop: {g.stop}, {g.new_tokens} new tokens{extra})\n\n```text\n{g.text}\n```")
        sections.append("\n\n".join(block))
    (folder / "comparison.md").write_text("\n\n".join(sections) + "\n")
