import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach for the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny-cpu.yaml"
# train_sft.py and eval_compare.py are scripts, imported by the tests; tools/random_model.py builds the fixtures
sys.path[:0] = [str(REPO), str(REPO / "tools")]

THREE = [
    {"instruction": "Translate the sentence into French.", "input": "The cat is sleeping on the sofa.",
     "output": "Le chat dort sur le canapé."},
    {"instruction": "Name the capital of Japan.", "input": "", "output": "Tokyo"},
    {"instruction": "Write a SQL query that answers the question for the given table.",
     "input": "How many employees are older than 40?\nCREATE TABLE employees (name VARCHAR, age INTEGER)",
     "output": "SELECT COUNT(*) FROM employees WHERE age > 40"},
]


def _cpu_runs_rowwise_fp8_gemms() -> bool:
    """torch 2.13's CPU _scaled_mm takes one scale per row, as the FP8 base's GEMMs give it; older ones (the GPU
    image's torch 2.11) take one per tensor only, so there the FP8 base's math is judged on the GPU alone."""
    import torch

    try:
        q, scale = torch.zeros(16, 16).to(torch.float8_e4m3fn), torch.ones(16, 1)
        torch._scaled_mm(q, q.t(), scale_a=scale, scale_b=scale.t(), out_dtype=torch.bfloat16)
    except (RuntimeError, TypeError, AttributeError):
        return False
    return True


# For the tests that run the FP8 base's GEMMs emulated on the CPU.
needs_cpu_fp8 = pytest.mark.skipif(not _cpu_runs_rowwise_fp8_gemms(),
                                   reason="this torch's CPU _scaled_mm has no row-wise scales (torch 2.13's has)")


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def parse(*overrides, config=TINY):
    from alpaca_sft.train.settings import parse_settings

    return parse_settings(["--config", str(config), *map(str, overrides)])


# The tiny recipe validates on 4 held-out examples; most tests train on a few examples and need none
# (tests/test_validation.py turns it back on): validation_size 0 turns validation off. Later flags win,
# so a test's own overrides come last.
NO_VALIDATION = ("--validation_size", 0)


def train(model_dir, output_dir, *overrides):
    """train_sft.py's main on the tiny recipe: the run's Outcome (its trainer in .trainer)."""
    import train_sft

    return train_sft.main(*parse("--model_name_or_path", model_dir, "--output_dir", output_dir, *NO_VALIDATION, *overrides))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from random_model import write_mistral_tokenizer

    return write_mistral_tokenizer(tmp_path_factory.mktemp("mistral-tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from alpaca_sft.models.tokenizer import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def sentencepiece_oracle(tokenizer_dir):
    """Raw sentencepiece on the same tokenizer.model: an independent reference for token ids."""
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from random_model import build_random_mistral

    return build_random_mistral(tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="session")
def tuned_three(tiny_model_dir, tmp_path_factory):
    """A tiny adapter that has memorized THREE (60 steps): trained once, used by training and eval tests."""
    folder = tmp_path_factory.mktemp("tuned-three")
    data = write_jsonl(folder / "three.jsonl", THREE)
    train(tiny_model_dir, folder / "run", "--dataset_name", data, "--max_steps", 60, "--learning_rate", 1e-2)
    return folder / "run"
