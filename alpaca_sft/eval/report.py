"""The comparison as people read it: a side-by-side listing, the tables (summary, answer classes, paired
tests; a row per prompt file where there are several), examples of each answer class, comparison.md and
comparison.json.

comparison.json (what a bench script builds its tables from):
    meta: the run: base, tuned (the --tuned folders, in order), prompts (the files), max_new_tokens,
        batch_size, batching, dtype, device.
    models: per model name ("base", then each tuned model by its folder name, made unique): path, and for a
        merged adapter merged_to, merge_max_abs_logit_diff, merge_and_save_seconds and, for a 4-bit or FP8
        trained one, qlora_gap or fp8_gap.
    scores: per model name: prompts, stopped_by_eos, exact_match, sql_executes, sql_result_match (rates, null
        where no prompt applies), mean_new_tokens, sql_prompts, prompts_per_second, new_tokens_per_second; counts
        {metric: [successes, trials]}, intervals {metric: [low, high]} (95% Wilson); classes {eos, ran_on, looped, cut: answers} and
        class_intervals {class: [low, high]}; groups {prompt file: the same numbers on its prompts, without
        the two speeds}.
    paired: one row per pair of models (a before b in the models' order), yes/no metric and group ("all" and,
        with several prompt files, each file): prompts, a_rate, b_rate, difference (b - a), only_a, only_b (the
        discordant prompts each way), p_value (McNemar's exact test).
    prompts: per prompt: id, prompt, reference, schema, group, line, and per model name its answer: text, stop,
        new_tokens, seconds, exact_match, sql, answer_class, class_detail.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..models.generation import Generation
from .endings import CLASSES, EOS
from .scoring import ALL, Judgment

METRICS = [
    ("stopped_by_eos", "answers that stop by EOS", "{:.1%}"),
    ("mean_new_tokens", "mean new tokens", "{:.1f}"),
    ("exact_match", "exact match (normalized)", "{:.1%}"),
    ("sql_executes", "SQL runs on the schema", "{:.1%}"),
    ("sql_result_match", "SQL result = reference's", "{:.1%}"),
    ("sql_refused", "SQL answers refused (not run)", "{:d}"),
    ("prompts_per_second", "prompts per second", "{:.2f}"),
    ("new_tokens_per_second", "new tokens per second", "{:,.0f}"),
]
SPEEDS = ("prompts_per_second", "new_tokens_per_second")  # of the whole run: no row per prompt file
EXAMPLES_PER_CLASS = 3


def _fmt(value, pattern, interval=None):
    if value is None:
        return "n/a"
    return pattern.format(value) + (f" ({interval[0]:.1%}–{interval[1]:.1%})" if interval else "")


def _groups(scores: dict) -> list[str]:
    """"all", then each prompt file when there are several."""
    groups = list(next(iter(scores.values())).get("groups", {}))
    return [ALL] + (groups if len(groups) > 1 else [])


def _numbers(model: dict, group: str) -> dict:
    return model if group == ALL else model["groups"][group]


def _header(first: str, names: list[str], grouped: bool) -> list[str]:
    columns = [first] + (["prompts"] if grouped else []) + names
    return ["| " + " | ".join(columns) + " |", "|---|" + ("---|" if grouped else "") + "---:|" * len(names)]


def _row(label: str, group: str, scores: dict, cells: list[str], grouped: bool) -> str:
    where = [f"{group} ({_numbers(next(iter(scores.values())), group)['prompts']})"] if grouped else []
    return "| " + " | ".join([label] + where + cells) + " |"


def summary_table(scores: dict[str, dict]) -> str:
    """A row per metric (and prompt file), a column per model; rates with their 95% interval."""
    names, groups = list(scores), _groups(scores)
    grouped = len(groups) > 1
    lines = _header("metric", names, grouped)
    for key, label, pattern in METRICS:
        for group in groups if key not in SPEEDS else [ALL]:
            numbers = [_numbers(scores[n], group) for n in names]
            cells = [_fmt(m.get(key), pattern, m.get("intervals", {}).get(key)) for m in numbers]
            if group == ALL or any(c != "n/a" for c in cells):
                lines.append(_row(label, group, scores, cells, grouped))
    return "\n".join(lines)


def classes_table(scores: dict[str, dict]) -> str:
    """How the answers ended: a row per class (and prompt file), answers and share with its 95% interval."""
    names, groups = list(scores), _groups(scores)
    grouped = len(groups) > 1
    lines = _header("answers that", names, grouped)
    labels = {"eos": "stop by EOS", "ran_on": "run on into new prompt blocks", "looped": "loop", "cut": "are cut at the limit"}
    for name in CLASSES:
        for group in groups:
            cells = []
            for n in names:
                numbers = _numbers(scores[n], group)
                count, low_high = numbers["classes"][name], numbers["class_intervals"][name]
                cells.append(f"{count} ({count / numbers['prompts']:.1%}, {low_high[0]:.1%}–{low_high[1]:.1%})")
            lines.append(_row(f"{labels[name]} (`{name}`)", group, scores, cells, grouped))
    return "\n".join(lines)


def paired_table(tests: list[dict]) -> str:
    """Each pair of models on the same prompts: every metric in all, the stop rate per prompt file too."""
    shown = [t for t in tests if t["group"] == ALL or t["metric"] == "stopped_by_eos"]
    lines = ["| models | metric | prompts | rates | difference | only the first / only the second | p (McNemar, exact) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for t in shown:
        lines.append(f"| {t['a']} vs {t['b']} | {t['metric']} | {t['group']} ({t['prompts']}) | {t['a_rate']:.1%} vs "
                     f"{t['b_rate']:.1%} | {100 * t['difference']:+.1f} pp | {t['only_a']} / {t['only_b']} | {t['p_value']:.3g} |")
    return "\n".join(lines)


def _cell(text: str, width: int) -> str:
    text = text.replace("\n", "⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def class_examples(prompts, generations: dict[str, list[Generation]], judgments: dict[str, list[Judgment]]) -> str:
    """Up to EXAMPLES_PER_CLASS answers of each model in each class: how it ended, and its end."""
    lines = ["| model | class | prompt | why | the answer's last 120 characters (eos: its first) |", "|---|---|---|---|---|"]
    for name in generations:
        for answer_class in CLASSES:
            found = [i for i, j in enumerate(judgments[name]) if j.answer_class == answer_class][:EXAMPLES_PER_CLASS]
            for i in found:
                g, j = generations[name][i], judgments[name][i]
                why = f"{g.stop}, {g.new_tokens} tokens" + (f"; {j.class_detail}" if j.class_detail else "")
                tail = g.text[-120:] if answer_class != EOS else g.text[:120]
                lines.append("| " + " | ".join(_cell(c, 200).replace("|", "\\|") for c in
                                               (name, answer_class, prompts[i].id, why, tail)) + " |")
    return "\n".join(lines)


def side_by_side(prompts, generations: dict[str, list[Generation]], judgments: dict[str, list[Judgment]],
                 width: int = 48) -> str:
    lines, name_width = [], max(map(len, generations))
    for i, prompt in enumerate(prompts):
        lines.append(f"[{prompt.id}]" + (f"  reference: {_cell(prompt.reference, 60)}" if prompt.reference else ""))
        for name in generations:
            g, j = generations[name][i], judgments[name][i]
            mark = {True: "=", False: "≠", None: " "}[j.exact_match]
            lines.append(f"  {name:>{name_width}} {mark} {j.answer_class:>6} {g.new_tokens:>4} tok  {_cell(g.text, width)}")
    return "\n".join(lines)


def tables(scores: dict[str, dict], tests: list[dict]) -> str:
    """What the console and comparison.md show of the numbers."""
    return "\n\n".join([summary_table(scores), classes_table(scores), paired_table(tests)])


def report_texts(prompts, generations: dict[str, list[Generation]], judgments: dict[str, list[Judgment]],
                 scores: dict, tests: list[dict], models: dict, meta: dict) -> dict[str, str]:
    """comparison.md and comparison.json, as texts."""
    payload = {
        "meta": meta, "models": models, "scores": scores, "paired": tests,
        "prompts": [
            {**asdict(p), **{name: {**asdict(generations[name][i]), **asdict(judgments[name][i])} for name in generations}}
            for i, p in enumerate(prompts)
        ],
    }
    sections = [
        "# " + " vs ".join(generations) + ": greedy generations",
        "\n".join(f"- {k}: `{' '.join(v) if isinstance(v, list) else v}`" for k, v in meta.items()),
        tables(scores, tests),
        "## Examples of each answer class\n\n" + class_examples(prompts, generations, judgments),
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
            block.append(f"**{name}** ({j.answer_class}, stop: {g.stop}, {g.new_tokens} new tokens{extra})\n\n"
                         f"```text\n{g.text}\n```")
        sections.append("\n\n".join(block))
    return {"comparison.md": "\n\n".join(sections) + "\n",
            "comparison.json": json.dumps(payload, indent=2, ensure_ascii=False)}


def model_names(paths: list) -> list[str]:
    """A column name per tuned folder: its name, with as many parent folders as make the names unique and
    none of them "base" (runs/a/checkpoint-500 and runs/b/checkpoint-500: a-checkpoint-500, b-checkpoint-500)."""
    parts = [Path(path).resolve().parts[1:] for path in paths]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["-".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) and "base" not in names:
            return names
    return [f"tuned-{i}" for i in range(1, len(paths) + 1)]  # the same folder twice: refused before this
