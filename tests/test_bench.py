"""The benchmark's own arithmetic and workload, checked on the CPU (the runs themselves need a GPU)."""

import json
import statistics
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import speed  # noqa: E402
import workload  # noqa: E402


def test_linear_weights_of_the_mistral_7b_shape(tmp_path):
    from transformers import MistralConfig

    from alpaca_sft.random_model import MISTRAL_7B

    MistralConfig(**MISTRAL_7B).save_pretrained(tmp_path)
    assert speed.linear_weights(str(tmp_path)) == 7_110_393_856  # 32 x 218.1M + the 131M lm_head


def test_workload_has_the_specified_shape(tmp_path, tokenizer):
    path = workload.write_workload(tmp_path / "w.jsonl", tokenizer, records=3000)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3000
    assert 0.37 < sum(bool(r["input"]) for r in rows) / len(rows) < 0.43

    def tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    sample = rows[:400]
    assert abs(statistics.median(tokens(r["instruction"]) for r in sample) - 14) <= 2
    assert abs(statistics.median(tokens(r["output"]) for r in sample) - 48) <= 8
    assert all(1 <= tokens(r["output"]) <= 1000 for r in sample)
    # one word, one token: the lengths drawn are the lengths trained
    assert all(tokens(r["instruction"]) == len(r["instruction"].split()) for r in sample)
