"""Answers kept in comparison.json files, scored again by today's alpaca_sft/eval: each answer's class (eos,
ran_on, looped, cut), every rate with its 95% interval, per prompt file, and the paired tests between models. The
base comes from the first file; each file's tuned model becomes a column named as given.

    python bench/rescore.py --name alpaca=bench/results/real-base/runs/bf16/comparison.json \\
        --name alpaca-sql=bench/results/real-base/runs/sql/comparison.json

The stored answers are not generated again: this is how the README's real-base table gains the answer classes and
intervals for runs measured before they existed (no GPU needed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the alpaca_sft package, when run from a checkout

from alpaca_sft.eval.prompts import EvalPrompt
from alpaca_sft.eval.report import tables
from alpaca_sft.eval.scoring import paired_tests, score
from alpaca_sft.models.generation import Generation

PROMPT_FIELDS = ("id", "prompt", "reference", "schema", "group", "line")


def stored(path: Path) -> tuple[list[EvalPrompt], dict[str, list[Generation]]]:
    """The prompts and each model's answers of one comparison.json. Files written before prompts had a group are
    grouped by their id's file part (`heldout_alpaca/line-1`)."""
    rows = json.loads(path.read_text(encoding="utf-8"))["prompts"]
    prompts = [EvalPrompt(**{key: row.get(key) for key in PROMPT_FIELDS if key in row},
                          **({} if row.get("group") else {"group": row["id"].split("/")[0]})) for row in rows]
    names = [name for name, value in rows[0].items() if isinstance(value, dict) and "stop" in value]
    answers = {name: [Generation(row[name]["text"], row[name]["stop"], row[name]["new_tokens"], row[name]["seconds"])
                      for row in rows] for name in names}
    return prompts, answers


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", action="append", required=True, metavar="NAME=COMPARISON_JSON",
                        help="a tuned model's column name and the comparison.json holding its answers")
    args = parser.parse_args(argv)
    generations, prompts = {}, None
    for named in args.name:
        name, _, path = named.partition("=")
        these, answers = stored(Path(path))
        if prompts is not None and [p.id for p in these] != [p.id for p in prompts]:
            parser.error(f"{path}: not the same prompts, in the same order, as {args.name[0].partition('=')[2]}")
        prompts = prompts or these
        generations.setdefault("base", answers["base"])
        generations[name] = answers["tuned"]
    scored = {name: score(prompts, answers) for name, answers in generations.items()}
    judgments = {name: judged for name, (_, judged) in scored.items()}
    text = tables({name: summary for name, (summary, _) in scored.items()},
                  paired_tests(prompts, generations, judgments))
    print(text)
    return text


if __name__ == "__main__":
    main()
