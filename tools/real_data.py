"""Split the real Alpaca and text-to-SQL rows into training files and held-out evaluation files.

    python tools/real_data.py ../shared/real-data build/real-data

Reads alpaca_real.jsonl (Stanford Alpaca records: instruction/input/output) and sql_create_context.jsonl
(b-mc2/sql-create-context rows: question/context/answer) from the first folder. Holds out --heldout rows of
each, drawn by --seed, and writes them to data/heldout_alpaca.jsonl and data/heldout_sql.jsonl (kept in the
repository: every evaluation uses the same prompts); writes everything else to <out>/alpaca_train.jsonl and
<out>/sql_train.jsonl. A training row whose prompt (instruction and input, or question) equals a held-out
one's, however spaced or cased, is left out too, so no held-out prompt is ever trained on. The held-out rows
have a non-empty answer, and a SQL reference that runs on its schema (eval_compare.py compares results).
"""

import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alpaca_sft.eval.sql_check import check_sql  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def prompt_key(row: dict) -> str:
    text = row["question"] if "question" in row else row["instruction"] + "\n" + (row.get("input") or "")
    return re.sub(r"\s+", " ", text).strip().lower()


def split(rows: list[dict], count: int, seed: int, usable) -> tuple[list[dict], list[dict]]:
    candidates = [r for r in rows if usable(r)]
    held = random.Random(seed).sample(candidates, count)
    held_keys = {prompt_key(r) for r in held}
    return [r for r in rows if prompt_key(r) not in held_keys], held


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="folder with alpaca_real.jsonl and sql_create_context.jsonl")
    parser.add_argument("out", type=Path, help="folder for the training files")
    parser.add_argument("--heldout", type=int, default=200, help="rows held out of each data set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout_dir", type=Path, default=REPO / "data")
    args = parser.parse_args(argv)

    alpaca, sql = read(args.source / "alpaca_real.jsonl"), read(args.source / "sql_create_context.jsonl")
    alpaca_train, alpaca_held = split(alpaca, args.heldout, args.seed, lambda r: r["output"].strip() != "")
    sql_train, sql_held = split(sql, args.heldout, args.seed,
                                lambda r: check_sql(r["answer"], r["context"], r["answer"]).matches_reference is True)
    write(args.out / "alpaca_train.jsonl", alpaca_train)
    write(args.out / "sql_train.jsonl", sql_train)
    write(args.heldout_dir / "heldout_alpaca.jsonl", alpaca_held)
    write(args.heldout_dir / "heldout_sql.jsonl", sql_held)
    counts = {"alpaca_read": len(alpaca), "alpaca_train": len(alpaca_train), "alpaca_heldout": len(alpaca_held),
              "sql_read": len(sql), "sql_train": len(sql_train), "sql_heldout": len(sql_held)}
    print(", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


if __name__ == "__main__":
    main()
