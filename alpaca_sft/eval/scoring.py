"""The numbers that compare two models' answers: EOS share, length, exact match, and for SQL
prompts whether the answer runs and returns the reference's result."""

from __future__ import annotations

import re
import statistics
import string
from dataclasses import asdict

from .generate import Generation
from .prompts import EvalPrompt
from .sql_check import check_sql, normalize_sql


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
