"""The comparison as people read it: a side-by-side listing, a summary table, comparison.md and
comparison.json."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..models.generation import Generation
from .scoring import Judgment

METRICS = [
    ("stopped_by_eos", "answers that stop by EOS", "{:.0%}"),
    ("mean_new_tokens", "mean new tokens", "{:.1f}"),
    ("exact_match", "exact match (normalized)", "{:.0%}"),
    ("sql_executes", "SQL runs on the schema", "{:.0%}"),
    ("sql_result_match", "SQL result = reference's", "{:.0%}"),
    ("sql_refused", "SQL answers refused (not run)", "{:d}"),
    ("prompts_per_second", "prompts per second", "{:.2f}"),
]


def _fmt(value, pattern):
    return "n/a" if value is None else pattern.format(value)


def summary_table(scores: dict[str, dict]) -> str:
    names = list(scores)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label, pattern in METRICS:
        lines.append(f"| {label} | " + " | ".join(_fmt(scores[n].get(key), pattern) for n in names) + " |")
    return "\n".join(lines)


def _cell(text: str, width: int) -> str:
    text = text.replace("\n", "⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def side_by_side(prompts, generations: dict[str, list[Generation]], judgments: dict[str, list[Judgment]],
                 width: int = 48) -> str:
    lines = []
    for i, prompt in enumerate(prompts):
        lines.append(f"[{prompt.id}]" + (f"  reference: {_cell(prompt.reference, 60)}" if prompt.reference else ""))
        for name in generations:
            g, j = generations[name][i], judgments[name][i]
            mark = {True: "=", False: "≠", None: " "}[j.exact_match]
            lines.append(f"  {name:>6} {mark} {g.stop:>6} {g.new_tokens:>4} tok  {_cell(g.text, width)}")
    return "\n".join(lines)


def write_report(folder: Path, prompts, generations: dict[str, list[Generation]], judgments: dict[str, list[Judgment]],
                 scores: dict, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": meta,
        "scores": scores,
        "prompts": [
            {**asdict(p), **{name: {**asdict(generations[name][i]), **asdict(judgments[name][i])} for name in generations}}
            for i, p in enumerate(prompts)
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
            g, j = generations[name][i], judgments[name][i]
            extra = f", exact match: {j.exact_match}" if j.exact_match is not None else ""
            if j.sql:
                extra += f", SQL runs: {j.sql['executes']}, result matches: {j.sql['matches_reference']}"
            block.append(f"**{name}** (stop: {g.stop}, {g.new_tokens} new tokens{extra})\n\n```text\n{g.text}\n```")
        sections.append("\n\n".join(block))
    (folder / "comparison.md").write_text("\n\n".join(sections) + "\n")
