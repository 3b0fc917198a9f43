"""The numbers that compare two models' answers: EOS share, length, exact match, and for SQL
prompts whether the answer runs and returns the reference's result. Nothing here changes what it
is given: each answer's judgment is returned beside it."""

from __future__ import annotations

import re
import statistics
import string
from dataclasses import asdict, dataclass

from ..models.generation import Generation
from .prompts import EvalPrompt
from .sql_check import check_sql, normalize_sql


@dataclass(frozen=True)
class Judgment:
    exact_match: bool | None  # None without a reference
    sql: dict | None = None  # for a SQL prompt: parses, executes, matches_reference, error


def normalize_text(text: str) -> str:
    text = text.strip().lower().rstrip(string.punctuation + " ")
    return re.sub(r"\s+", " ", text)


def judge(prompt: EvalPrompt, generation: Generation) -> Judgment:
    if prompt.schema is not None:
        sql = asdict(check_sql(generation.text, prompt.schema, prompt.reference))
        same = normalize_sql(generation.text) == normalize_sql(prompt.reference) if prompt.reference is not None else None
        return Judgment(same, sql)
    if prompt.reference is not None:
        return Judgment(normalize_text(generation.text) == normalize_text(prompt.reference))
    return Judgment(None)


def score(prompts: list[EvalPrompt], generations: list[Generation]) -> tuple[dict, list[Judgment]]:
    """Per-model numbers (EOS share, mean new tokens, exact match, SQL execution and result match,
    prompts per second), and the judgment of each answer."""
    judgments = [judge(p, g) for p, g in zip(prompts, generations)]
    with_reference = [j.exact_match for j in judgments if j.exact_match is not None]
    sql = [j.sql for j in judgments if j.sql is not None]
    sql_with_reference = [s["matches_reference"] for s in sql if s["matches_reference"] is not None]
    seconds = sum(g.seconds for g in generations)
    summary = {
        "prompts": len(generations),
        "stopped_by_eos": sum(g.stop == "eos" for g in generations) / len(generations),
        "mean_new_tokens": statistics.fmean(g.new_tokens for g in generations),
        "exact_match": statistics.fmean(with_reference) if with_reference else None,
        "sql_prompts": len(sql),
        "sql_executes": statistics.fmean(s["executes"] for s in sql) if sql else None,
        "sql_result_match": statistics.fmean(sql_with_reference) if sql_with_reference else None,
        "sql_refused": sum(s["refused"] is not None for s in sql) if sql else None,
        "prompts_per_second": len(generations) / seconds if seconds else None,
    }
    return summary, judgments
