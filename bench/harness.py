"""What bench/'s measuring tools share: their command line's frame, the run train_sft.py prepares from a recipe (so
that a tool measures what train_sft.py trains, its checks and pipeline defaults included), and writing results.

    from harness import argument_parser, prepared_run, write_results   # in a tool beside this file
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A tool's argument parser, its module docstring (commands and all) as the help."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_and_data(parser: argparse.ArgumentParser) -> None:
    """--model and --data: the base's folder (tools/random_model.py's, or the real one) and an Alpaca JSONL file
    (bench/workload.py's, or the real one), as the tools that train or build batches take them."""
    parser.add_argument("--model", required=True, help="a local model folder")
    parser.add_argument("--data", required=True, help="Alpaca JSONL (instruction/input/output)")


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def fp32_on_cpu() -> list[str]:
    """train_sft.py's flags that load the base in fp32 on a machine without a GPU (no bf16 autocast there)."""
    return [] if torch.cuda.is_available() else ["--dtype", "float32"]


def prepared_run(recipe: str, *flags: str):
    """train_sft.py's prepared run (alpaca_sft/train/prepare.py) of `recipe` with train_sft.py's `flags` on top, on
    this machine (the CPU overrides where there is no GPU): checked, the pipeline's defaults filled in, its output_dir
    claimed, its tokenizer and data built. Use it as a context manager to free the folder when done."""
    from alpaca_sft.train.prepare import prepare_run
    from alpaca_sft.train.settings import cpu_overrides, parse_settings

    return prepare_run(*parse_settings(["--config", recipe, *cpu_overrides(), *map(str, flags)]))


def write_results(path: Path, results: dict) -> None:
    """The results as JSON at `path` (its folder made), rewritten whole each time: a tool that writes after every
    part leaves what finished if it is cut off."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
