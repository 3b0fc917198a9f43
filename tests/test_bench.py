"""The benchmark's own arithmetic and workload, checked on the CPU (the runs themselves need a GPU)."""

import json
import statistics
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import speed  # noqa: E402
import step_gaps  # noqa: E402
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
         "--variants", "recipe", "rows-4", "bf16-adapters", "no-adapters", "unshared"],
        cwd=REPO, check=True, capture_output=True,
    )
    variants = json.loads(out.read_text())["variants"]
    assert list(variants) == ["recipe", "rows-4", "bf16-adapters", "no-adapters", "unshared"]
    assert variants["recipe"]["rows"] == 2 and variants["rows-4"]["rows"] == 4  # tiny-cpu.yaml packs 2 rows per step
    assert (variants["bf16-adapters"]["tokens"] == variants["no-adapters"]["tokens"] == variants["unshared"]["tokens"]
            == variants["recipe"]["tokens"])
    assert variants["rows-4"]["tokens"] > variants["recipe"]["tokens"] > 0
    assert all(v["tokens_per_second"] > 0 for v in variants.values())


def test_step_breakdowns_trainer_is_train_sft_pys_checked_and_filled_in_as_a_run_is(tiny_model_dir, tmp_path):
    # bench/step_breakdown.py (and bench/step_gaps.py through it) measures train_sft.py's trainer: a setting given
    # to it reaches the Trainer, the pipeline's defaults fill the rest, and a setting train_sft.py refuses is refused
    import argparse

    import step_breakdown

    from alpaca_sft.train.settings import SettingsError

    args = argparse.Namespace(config=str(REPO / "recipes/tiny-cpu.yaml"), model=str(tiny_model_dir),
                              data=str(REPO / "data/alpaca_sample.jsonl"), work=tmp_path / "work", rows=24)
    trainer = step_breakdown.recipe_trainer(args, "--logging_nan_inf_filter", "true")
    assert trainer.args.logging_nan_inf_filter is True  # given: the user's
    assert trainer.args.include_num_input_tokens_seen is True  # not given: the pipeline's default, as in a run
    args.work = tiny_model_dir  # the base's own folder: train_sft.py refuses to write a run there
    with pytest.raises(SettingsError, match="is a model folder"):
        step_breakdown.recipe_trainer(args)


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


def test_step_gaps_charges_each_idle_stretch_to_the_host_work_beside_it():
    def event(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    trace = {"traceEvents": [
        event("kernel", "gemm", 0, 1000), event("kernel", "gemm", 500, 1000),  # overlapping: busy 0-1500 us
        event("user_annotation", "Optimizer.step#AdamW.step", 1400, 700), event("cpu_op", "aten::add", 1450, 20),
        event("kernel", "adam", 2000, 100),  # 0.5 ms idle: the optimizer's annotation overlaps it most
        event("cpu_op", "aten::item", 2050, 1500), event("cuda_runtime", "cudaStreamSynchronize", 2100, 1400),
        event("kernel", "gemm", 3600, 400),  # 1.5 ms idle: no annotation, the outermost operator is the .item()
        event("gpu_memcpy", "Memcpy HtoD", 4010, 5),  # 0.01 ms: under --gap_ms, not charged
    ]}
    result = step_gaps.gaps(trace, min_gap_ms=0.1)
    assert result["gpu_span_ms"] == 4.015 and abs(result["gpu_busy_ms"] - 2.005) < 1e-9
    assert abs(result["gpu_idle_ms"] - 2.01) < 1e-9 and abs(result["idle_in_gaps_of_0.1_ms_or_more"] - 2.0) < 1e-9
    assert [(g["host_work"], g["gaps"]) for g in result["gaps_by_host_work"]] == [
        ("aten::item", 1), ("Optimizer.step#AdamW.step", 1)]


def test_fp8_yardstick_table_measures_each_run_in_bf16_seed_spreads(tmp_path):
    import fp8_yardstick

    results = tmp_path / "out"
    results.mkdir()

    ids = ["heldout_alpaca/line-1", "heldout_alpaca/line-2", "heldout_sql/line-1", "heldout_sql/line-2"]
    judged = {}  # comparison file -> model -> stops: eval_compare.py judges several runs beside one base per call

    def write_run(name, as_trained, merged, stops, rate=None, comparison="a"):
        evaluations = [{"step": 0, "loss": 1.9835 + (0.0194 if name == "fp8" else 0)}, {"step": 177, "loss": as_trained,
                                                                                    "eos_top1": 0.8}]
        (results / f"summary-{name}.json").write_text(json.dumps({"validation": {"evaluations": evaluations,
                                                                                "last": evaluations[-1]}}))
        judged.setdefault(comparison, {})[name] = stops
        if rate:
            (tmp_path / "speed").mkdir(exist_ok=True)
            (tmp_path / "speed" / f"{fp8_yardstick.speed_config(name)}.json").write_text(
                json.dumps({"tokens_per_second": {"last_logged": rate}}))
        return {"unmerged": {"loss": as_trained, "eos_top1": 0.8}, "merged": {"loss": merged, "eos_top1": 0.8}}

    def scores(stops):
        rate = lambda part: sum(part) / len(part)  # noqa: E731
        return {"stopped_by_eos": rate(stops), "sql_result_match": 0.0, "mean_new_tokens": 100.0,
                "classes": {"eos": sum(stops), "ran_on": 0, "looped": len(stops) - sum(stops), "cut": 0},
                "groups": {"heldout_alpaca": {"stopped_by_eos": rate(stops[:2])}, "heldout_sql": {"stopped_by_eos": rate(stops[2:])}}}

    validated = {
        "bf16-seed42": write_run("bf16-seed42", 1.7311, 1.7312, [1, 1, 1, 0], rate=17_613),
        "bf16-seed43": write_run("bf16-seed43", 1.7279, 1.7280, [1, 1, 1, 1]),  # spreads: loss 0.0032, stop 0.25
        "fp8": write_run("fp8", 1.7423, 1.7330, [1, 0, 1, 1], rate=22_876),  # 1.30x
        "fp8-attention": write_run("fp8-attention", 1.7340, 1.7400, [1, 1, 1, 0], rate=18_000, comparison="b"),
        "fp8-down-bf16": write_run("fp8-down-bf16", 1.7330, 1.7320, [1, 1, 1, 0], comparison="b"),
    }
    for comparison, models in judged.items():
        prompts = [{"id": i, **{m: {"stop": "eos" if stops[k] else "length"} for m, stops in models.items()}}
                   for k, i in enumerate(ids)]
        (results / f"comparison-{comparison}.json").write_text(json.dumps({
            "meta": {}, "models": {m: {"fp8_gap": None} for m in models},
            "scores": {"base": scores([0, 0, 0, 0]), **{m: scores(stops) for m, stops in models.items()}},
            "prompts": prompts}))
    (results / "validate.json").write_text(json.dumps(validated))
    sys.argv = ["fp8_yardstick.py", "table", "--results", str(results), "--speed", str(tmp_path / "speed"),
                "--out", str(results / "fp8-yardstick.md")]
    fp8_yardstick.main()
    result = json.loads((tmp_path / "out" / "fp8-yardstick.json").read_text())
    fp8 = result["distances"]["fp8"]
    assert fp8["val_loss_as_trained"]["spreads"] == pytest.approx(0.0112 / 0.0032)  # 3.5: the FP8 forward's own error
    assert fp8["val_loss_bf16_base"]["spreads"] == pytest.approx(0.0018 / 0.0032)
    assert fp8["stop_all"]["difference"] == 0 and fp8["stop_heldout_sql"]["spreads"] == pytest.approx(1.0)
    # where the bf16 seeds agree there is no spread to measure in: the difference alone is given
    assert fp8["stop_heldout_alpaca"]["spreads"] is None and fp8["stop_heldout_alpaca"]["difference"] == -0.5
    rows = {line.split(" | ")[0][2:]: line for line in (tmp_path / "out" / "fp8-yardstick.md").read_text().splitlines()
            if line.startswith("| ")}
    assert "1.7423 (+0.0112; 3.5 spreads)" in rows["fp8"] and rows["fp8"].endswith("| 22,876 (1.30x) | **meets the target** |")
    # paired on the same prompts, across comparison files: seed 42 alone stops on line-2, fp8 alone on the last
    assert "| 1 / 1 (1) | 1 / 0 / 0 |" in rows["fp8"] and "| 0 / 0 (1) | 1 / 0 / 0 |" in rows["fp8-attention"]
    assert rows["fp8-attention"].endswith("(1.02x) | not close, slow |")  # 2.8 spreads on the bf16 base's loss
    assert rows["fp8-down-bf16"].endswith("| n/a | close, speed not measured |")
    assert "held-out stop: heldout_sql" in rows["run"] and "0.0032" in rows["bf16 seed spread, \\|43 - 42\\|"]
    assert "fp8 +0.0194, fp8-down-bf16 +0.0000, fp8-attention +0.0000." in (results / "fp8-yardstick.md").read_text()
