"""The numbers that compare models' answers: EOS share, how each answer ended (alpaca_sft/eval/endings.py),
length, exact match, and for SQL prompts whether the answer runs and returns the reference's result; each
rate with its 95% interval, per prompt file (group) and in all, and paired tests between models on the same
prompts (alpaca_sft/eval/stats.py). Nothing here changes what it is given: each answer's judgment is
returned beside it."""

from __future__ import annotations

import re
import statistics
import string
from dataclasses import asdict, dataclass
from itertools import combinations

from ..models.generation import Generation
from .endings import CLASSES, classify
from .prompts import EvalPrompt
from .sql_check import check_sql, normalize_sql
from .stats import mcnemar_exact, wilson


@dataclass(frozen=True)
class Judgment:
    exact_match: bool | None  # None without a reference
    sql: dict | None = None  # for a SQL prompt: parses, executes, matches_reference, error
    answer_class: str | None = None  # eos, ran_on, looped or cut (endings.py)
    class_detail: str | None = None  # ran_on: the line that opens a new block; looped: the span and its copies


# The yes/no outcomes of one answer (None where the metric does not apply): the rates, their intervals and
# the paired tests are all counted from these.
OUTCOMES = {
    "stopped_by_eos": lambda g, j: g.stop == "eos",
    "exact_match": lambda g, j: j.exact_match,
    "sql_executes": lambda g, j: j.sql["executes"] if j.sql else None,
    "sql_result_match": lambda g, j: j.sql["matches_reference"] if j.sql else None,
}
ALL = "all"  # the group of every prompt, beside each prompt file's own


def normalize_text(text: str) -> str:
    text = text.strip().lower().rstrip(string.punctuation + " ")
    return re.sub(r"\s+", " ", text)


def judge(prompt: EvalPrompt, generation: Generation) -> Judgment:
    ending = classify(generation.text, generation.stop, prompt.prompt)
    classed = {"answer_class": ending.answer_class, "class_detail": ending.detail}
    if prompt.schema is not None:
        sql = asdict(check_sql(generation.text, prompt.schema, prompt.reference))
        same = normalize_sql(generation.text) == normalize_sql(prompt.reference) if prompt.reference is not None else None
        return Judgment(same, sql, **classed)
    if prompt.reference is not None:
        return Judgment(normalize_text(generation.text) == normalize_text(prompt.reference), **classed)
    return Judgment(None, **classed)


def summarize(generations: list[Generation], judgments: list[Judgment]) -> dict:
    """One model's numbers on some prompts: each rate with its successes, trials and 95% Wilson interval,
    the answers of each class, mean new tokens."""
    sql = [j.sql for j in judgments if j.sql is not None]
    summary = {"prompts": len(generations), "mean_new_tokens": statistics.fmean(g.new_tokens for g in generations),
               "sql_prompts": len(sql), "sql_refused": sum(s["refused"] is not None for s in sql) if sql else None,
               "counts": {}, "intervals": {}}
    for metric, outcome in OUTCOMES.items():
        seen = [o for o in (outcome(g, j) for g, j in zip(generations, judgments)) if o is not None]
        summary[metric] = sum(seen) / len(seen) if seen else None
        summary["counts"][metric] = [sum(seen), len(seen)]
        summary["intervals"][metric] = wilson(sum(seen), len(seen))
    classes = [j.answer_class for j in judgments]
    summary["classes"] = {name: classes.count(name) for name in CLASSES}
    summary["class_intervals"] = {name: wilson(classes.count(name), len(classes)) for name in CLASSES}
    return summary


def groups_of(prompts: list[EvalPrompt]) -> list[str]:
    return list(dict.fromkeys(p.group for p in prompts))


def score(prompts: list[EvalPrompt], generations: list[Generation]) -> tuple[dict, list[Judgment]]:
    """One model's numbers in all (as summarize() gives them, and prompts and new tokens per second) and per prompt file
    ("groups"), and the judgment of each answer."""
    judgments = [judge(p, g) for p, g in zip(prompts, generations)]
    summary = summarize(generations, judgments)
    seconds = sum(g.seconds for g in generations)
    summary["prompts_per_second"] = len(generations) / seconds if seconds else None
    summary["new_tokens_per_second"] = sum(g.new_tokens for g in generations) / seconds if seconds else None
    summary["groups"] = {}
    for group in groups_of(prompts):
        members = [i for i, p in enumerate(prompts) if p.group == group]
        summary["groups"][group] = summarize([generations[i] for i in members], [judgments[i] for i in members])
    return summary, judgments


def paired_tests(prompts: list[EvalPrompt], generations: dict[str, list[Generation]],
                 judgments: dict[str, list[Judgment]]) -> list[dict]:
    """Every pair of models (in their order), every yes/no metric, in all and per prompt file: the two rates on
    the prompts both were judged on, the discordant prompts each way, McNemar's exact p-value."""
    tests = []
    groups = [ALL] + (groups_of(prompts) if len(groups_of(prompts)) > 1 else [])
    for a, b in combinations(generations, 2):
        for metric, outcome in OUTCOMES.items():
            for group in groups:
                pairs = [(outcome(generations[a][i], judgments[a][i]), outcome(generations[b][i], judgments[b][i]))
                         for i, p in enumerate(prompts) if group in (ALL, p.group)]
                pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
                if not pairs:
                    continue
                only_a, only_b = sum(x and not y for x, y in pairs), sum(y and not x for x, y in pairs)
                rate_a, rate_b = sum(x for x, _ in pairs) / len(pairs), sum(y for _, y in pairs) / len(pairs)
                tests.append({"a": a, "b": b, "metric": metric, "group": group, "prompts": len(pairs),
                              "a_rate": rate_a, "b_rate": rate_b, "difference": rate_b - rate_a,
                              "only_a": only_a, "only_b": only_b, "p_value": mcnemar_exact(only_a, only_b)})
    return tests
