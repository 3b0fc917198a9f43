"""The benchmark's own arithmetic and workload, checked on the CPU (the runs themselves need a GPU)."""

import json
import statistics
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import speed  # noqa: E402
import workload  # noqa: E402


def test_linear_weights_of_the_mistral_7b_shape(tmp_path):
    from transformers import MistralConfig

    from random_model import MISTRAL_7B

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


@pytest.mark.slow
def test_step_breakdown_times_each_lever_on_the_same_micro_batches(tiny_model_dir, tmp_path):
    import subprocess

    out = tmp_path / "breakdown.json"
    subprocess.run(
        [sys.executable, "bench/step_breakdown.py", "--model", str(tiny_model_dir), "--data", "data/alpaca_sample.jsonl",
         "--config", "recipes/tiny-cpu.yaml", "--rows", "24", "--steps", "1", "--out", str(out),
         "--variants", "recipe", "rows-4", "bf16-adapters", "no-adapters"],
        cwd=REPO, check=True, capture_output=True,
    )
    variants = json.loads(out.read_text())["variants"]
    assert list(variants) == ["recipe", "rows-4", "bf16-adapters", "no-adapters"]
    assert variants["recipe"]["rows"] == 2 and variants["rows-4"]["rows"] == 4  # tiny-cpu.yaml packs 2 rows per step
    assert variants["bf16-adapters"]["tokens"] == variants["no-adapters"]["tokens"] == variants["recipe"]["tokens"]
    assert variants["rows-4"]["tokens"] > variants["recipe"]["tokens"] > 0
    assert all(v["tokens_per_second"] > 0 for v in variants.values())


def test_attention_kernels_times_the_workloads_own_packed_micro_batches(tokenizer_dir, tokenizer, tmp_path):
    import attention_kernels

    from alpaca_sft.data.dataset import build_dataset

    data = workload.write_workload(tmp_path / "w.jsonl", tokenizer, records=600)
    batches = attention_kernels.packed_micro_batches(str(tokenizer_dir), str(data), rows=6, count=3)
    lengths = {len(ids) for ids in build_dataset(str(data), tokenizer, max_length=2048)[0]["input_ids"]}
    assert len(batches) == 3 and len({tuple(b) for b in batches}) == 3  # three different micro-batches
    for documents in batches:  # 6 packed rows of at most 2,048 tokens, each document one whole example
        assert 5 * 2048 < sum(documents) <= 6 * 2048
        assert set(documents) <= lengths
