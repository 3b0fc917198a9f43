import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach for the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # train_sft.py and eval_compare.py are scripts, imported by the tests


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from alpaca_sft.random_model import write_mistral_tokenizer

    return write_mistral_tokenizer(tmp_path_factory.mktemp("mistral-tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from alpaca_sft.modeling import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def sentencepiece_oracle(tokenizer_dir):
    """Raw sentencepiece on the same tokenizer.model: an independent reference for token ids."""
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from alpaca_sft.random_model import build_random_mistral

    return build_random_mistral(tmp_path_factory.mktemp("tiny-mistral"))


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
