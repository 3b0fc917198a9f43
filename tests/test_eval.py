"""eval_compare.py: pairing checks, merge equivalence, the comparison, SQL checks, the Hub push."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, needs_cpu_fp8, write_jsonl
from hub_server import HubServer

import eval_compare
from alpaca_sft.models.tokenizer import load_tokenizer
from alpaca_sft.eval.prompts import PromptFileError, read_prompts
from alpaca_sft.eval.sql_check import check_sql
from alpaca_sft.release.merge import logits_on, merge, save_merged
from alpaca_sft.release.pairing import PairError, inspect_pair
from conftest import THREE, train

SCHEMA = "CREATE TABLE table_name_12 (class VARCHAR, frequency_mhz VARCHAR, city_of_license VARCHAR)"
SHOWCASE = 'SELECT class FROM table_name_12 WHERE frequency_mhz > 91.5 AND city_of_license = "hyannis, nebraska"'


@pytest.fixture(scope="module")
def adapter_dir(tuned_three):
    """A tiny adapter that has memorized THREE."""
    return tuned_three


@pytest.fixture
def prompt_file(tmp_path):
    rows = [{"id": f"train-{i}", "instruction": r["instruction"], "input": r["input"], "reference": r["output"]}
            for i, r in enumerate(THREE)]
    rows.append({"id": "sql", "prompt": "### Input:\nWhich class?\n\n### Context:\n" + SCHEMA + "\n\n### Response:\n",
                 "schema": SCHEMA, "reference": SHOWCASE})
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def run_eval(*args):
    return eval_compare.main(eval_compare.parse_args(list(map(str, args))))


def test_merged_model_logits_equal_base_plus_adapter(tiny_model_dir, adapter_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(adapter_dir))
    texts = ["### Response:\nHello", "Below is an instruction.\n\n### Instruction:\nName the capital of Japan."]
    reference = logits_on(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter_dir)), tokenizer, texts
    )
    plain_base = logits_on(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, texts)
    assert (reference - plain_base).abs().max() > 1.0  # the adapter changes the model a lot...

    merged, gap = merge(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir, tokenizer, texts)
    assert gap < 1e-4
    folder = save_merged(merged, tokenizer, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, no PEFT
    torch.testing.assert_close(logits_on(reloaded, tokenizer, texts), reference, rtol=1e-4, atol=1e-4)  # ...and merging keeps it
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] in (2, [2])

    bf16, bf16_gap = merge(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16), adapter_dir,
                           tokenizer, texts)
    # A bf16 model rounds weights and activations in every layer: its gap is a few bf16 steps of the logits'
    # scale (0.31 of 11.2 here), well under what the adapter itself changes (> 1.0, above).
    assert bf16.dtype == torch.bfloat16 and bf16_gap < 0.05 * reference.abs().max().item()


def test_compare_shows_the_tuned_model_answering_and_stopping(tiny_model_dir, adapter_dir, prompt_file, tmp_path):
    out = tmp_path / "cmp"
    scores = run_eval("--base", tiny_model_dir, "--tuned", adapter_dir, "--prompts", prompt_file,
                      "--output_dir", out, "--max_new_tokens", 24, "--batch_size", 3)
    base, tuned = scores["base"], scores["tuned"]
    assert base["stopped_by_eos"] == 0 and base["mean_new_tokens"] == 24
    assert tuned["stopped_by_eos"] >= 0.75  # the three trained prompts stop (the SQL one may not)
    assert tuned["exact_match"] >= 0.75 and base["exact_match"] == 0
    assert base["sql_prompts"] == tuned["sql_prompts"] == 1 and base["sql_executes"] == 0
    report = json.loads((out / "comparison.json").read_text())
    first = report["prompts"][0]
    assert first["tuned"]["text"] == THREE[0]["output"] and first["tuned"]["stop"] == "eos"
    assert first["base"]["stop"] == "length" and first["base"]["new_tokens"] == 24
    assert report["meta"]["merge_max_abs_logit_diff"] < 1e-4
    markdown = (out / "comparison.md").read_text()
    assert "| answers that stop by EOS | 0% |" in markdown and "## train-0" in markdown
    merged = out / "merged"
    assert (merged / "README.md").read_text().startswith("---\nbase_model:")
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(merged).config.num_hidden_layers == 2


def test_compare_accepts_an_already_merged_model(tiny_model_dir, adapter_dir, prompt_file, tmp_path):
    run_eval("--base", tiny_model_dir, "--tuned", adapter_dir, "--prompts", prompt_file, "--output_dir", tmp_path / "a",
             "--max_new_tokens", 8)
    scores = run_eval("--base", tiny_model_dir, "--tuned", tmp_path / "a" / "merged", "--prompts", prompt_file,
                      "--output_dir", tmp_path / "b", "--max_new_tokens", 8)
    first = json.loads((tmp_path / "a" / "comparison.json").read_text())["prompts"]
    second = json.loads((tmp_path / "b" / "comparison.json").read_text())["prompts"]
    assert [p["tuned"]["text"] for p in first] == [p["tuned"]["text"] for p in second]
    assert scores["tuned"]["prompts"] == 4


def test_sql_checks():
    assert check_sql(SHOWCASE, SCHEMA, SHOWCASE).matches_reference
    same_meaning = "SELECT class FROM table_name_12 WHERE city_of_license = 'hyannis, nebraska' AND frequency_mhz > 91.5"
    assert check_sql(same_meaning, SCHEMA, SHOWCASE).matches_reference
    looser = "SELECT class FROM table_name_12 WHERE frequency_mhz > 91.5"
    result = check_sql(looser, SCHEMA, SHOWCASE)
    assert result.executes and not result.matches_reference
    wrong_column = check_sql("SELECT klass FROM table_name_12", SCHEMA, SHOWCASE)
    assert wrong_column.parses and not wrong_column.executes and "klass" in wrong_column.error
    assert not check_sql("the answer is forty", SCHEMA, SHOWCASE).executes
    # Only the first statement counts: a model that goes on after its query is judged on the query.
    assert check_sql(SHOWCASE + "; SELECT 1 FROM nowhere", SCHEMA, SHOWCASE).matches_reference


def test_shipped_prompt_file_holds_the_showcase_with_references():
    prompts = read_prompts(REPO / "data" / "eval_prompts.jsonl")
    showcase = next(p for p in prompts if p.id == "showcase-sql")
    assert "Which Class has a Frequency MHz larger than 91.5, and a City of license of hyannis, nebraska?" in showcase.prompt
    assert "### Context:\n" + SCHEMA in showcase.prompt and showcase.prompt.endswith("### Response:\n")
    sql = [p for p in prompts if p.schema]
    assert len(sql) >= 5 and all(check_sql(p.reference, p.schema, p.reference).matches_reference for p in sql)
    assert len(prompts) - len(sql) >= 5


@pytest.mark.parametrize("content,message", [
    ("", "holds no prompts"),
    ('{"instruction": "a"}\n{"instruction": \n', "line 2: not valid JSON"),
    ('{"instruction": "a"}\n{"input": "no instruction"}\n', "line 2: needs a non-empty `prompt`, `instruction`, or `question`"),
    ('{"prompt": "p", "reference": 3}\n', "line 1: `reference` must be a string"),
])
def test_bad_prompt_file_fails_before_any_model_loads(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(PromptFileError, match=message):  # against model folders that do not exist: read first
        run_eval("--base", "nowhere", "--tuned", "nowhere", "--prompts", path)


@pytest.mark.slow
def test_a_bad_prompt_file_ends_the_script_in_one_message(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "reference": 3}])
    result = subprocess.run([sys.executable, str(REPO / "eval_compare.py"), "--base", "nowhere", "--tuned", "nowhere",
                             "--prompts", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "line 1: `reference` must be a string" in result.stderr
    assert "Traceback" not in result.stderr


def test_adapter_from_another_base_is_refused_before_weights_load(tiny_model_dir, adapter_dir, tmp_path):
    import shutil

    from random_model import build_random_mistral
    from transformers import MistralConfig

    with pytest.raises(PairError, match="no such folder"):
        inspect_pair(str(tiny_model_dir), tmp_path / "missing")
    # Another shape, weights absent: only configs and shapes are read.
    other = tmp_path / "other"
    MistralConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2).save_pretrained(other)
    with pytest.raises(PairError, match="not the same model|was not trained on"):
        inspect_pair(str(other), adapter_dir)
    # The same shape with other weights (in life: the Instruct model, or another fine-tune) is refused too...
    twin = build_random_mistral(tmp_path / "twin", seed=1)
    with pytest.raises(PairError, match="makes a model nobody trained.*--allow_other_base"):
        inspect_pair(str(twin), adapter_dir)
    assert inspect_pair(str(twin), adapter_dir, allow_other_base=True).is_adapter  # ...unless asked for
    # ...while the same weights in another folder are the same base.
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert inspect_pair(str(copy), adapter_dir).is_adapter


def test_an_interrupted_run_points_to_its_newest_complete_checkpoint(tiny_model_dir, adapter_dir, tmp_path):
    import shutil

    from alpaca_sft.train.checkpoints import SEAL

    stopped = tmp_path / "stopped"
    for step in (3, 6):  # 3 sealed; 6 as a kill -9 in the middle of its save leaves it
        shutil.copytree(adapter_dir, stopped / f"checkpoint-{step}", ignore=shutil.ignore_patterns("comparison*"))
    (stopped / "checkpoint-3" / SEAL).write_text("{}")
    with pytest.raises(PairError, match=r"holds no finished adapter .* --tuned .*checkpoint-3 \(checkpoint-6 not completely"):
        inspect_pair(str(tiny_model_dir), stopped)
    with pytest.raises(PairError, match=r"checkpoint-6 was not completely written .* --tuned .*checkpoint-3"):
        inspect_pair(str(tiny_model_dir), stopped / "checkpoint-6")
    with pytest.raises(PairError, match="is --base itself"):
        inspect_pair(str(tiny_model_dir), tiny_model_dir)


def test_the_folder_evaluated_is_left_as_it_was(tiny_model_dir, adapter_dir, prompt_file, tmp_path):
    import shutil

    tuned = shutil.copytree(adapter_dir, tmp_path / "run")
    before = sorted(p.relative_to(tuned) for p in tuned.rglob("*"))
    run_eval("--base", tiny_model_dir, "--tuned", tuned, "--prompts", prompt_file, "--max_new_tokens", 4)
    assert sorted(p.relative_to(tuned) for p in tuned.rglob("*")) == before
    assert (tmp_path / "run-comparison" / "comparison.md").is_file()
    assert (tmp_path / "run-comparison" / "merged" / "README.md").is_file()


@pytest.mark.slow
def test_push_uploads_merged_model_and_card_to_the_hub(tiny_model_dir, adapter_dir, prompt_file, tmp_path):
    secret = "hf_test_secret_token_123"
    env = {**os.environ, "HF_TOKEN": secret, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    command = [sys.executable, str(REPO / "eval_compare.py"), "--base", str(tiny_model_dir), "--tuned", str(adapter_dir),
               "--prompts", str(prompt_file), "--output_dir", str(tmp_path / "cmp"), "--max_new_tokens", "8",
               "--push_to_hub", "me/tiny-alpaca", "--private"]
    with HubServer() as hub:
        result = subprocess.run(command, env={**env, "HF_ENDPOINT": hub.url}, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        merged = tmp_path / "cmp" / "merged"
        uploaded = hub.files["me/tiny-alpaca"]
        local = {p.name: p.read_bytes() for p in merged.iterdir() if p.is_file()}
        assert set(uploaded) == set(local) and all(uploaded[name] == local[name] for name in local)
        card = uploaded["README.md"].decode()
        for expected in (f"base_model: {tiny_model_dir}", "license: other", "answers that stop by EOS",
                         "trained tokens", "lora_r"):
            assert expected in card, expected
        created = hub.repos["me/tiny-alpaca"]
        assert created.get("private") is True or created.get("visibility") == "private"  # old / new client
        assert f"Bearer {secret}" in hub.authorization  # the token was used...
        assert secret not in result.stdout + result.stderr  # ...and never shown

        hub.fail_commits = True
        failed = subprocess.run(command, env={**env, "HF_ENDPOINT": hub.url}, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1
    assert "push to me/tiny-alpaca failed" in failed.stderr and f"hf upload me/tiny-alpaca {merged}" in failed.stderr
    assert secret not in failed.stdout + failed.stderr
    assert (merged / "model.safetensors").exists() and (merged / "README.md").exists()

    # No Hub to push to: refused before any model loads, not after the merge and the generations.
    early = command[:command.index("--output_dir") + 1] + [str(tmp_path / "cmp2")] + command[command.index("--output_dir") + 2:]
    result = subprocess.run(early, env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "cannot push to me/tiny-alpaca" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "cmp2").exists() and "generating" not in result.stdout


def test_a_repository_id_the_hub_would_refuse_is_refused_before_anything_loads(capsys):
    with pytest.raises(SystemExit) as exit_:
        eval_compare.parse_args(["--base", "b", "--tuned", "t", "--push_to_hub", "a/b/c"])
    assert exit_.value.code == 2 and "--push_to_hub a/b/c: not a Hub repository id" in capsys.readouterr().err


def test_qlora_adapter_is_merged_in_full_precision_and_its_gap_reported(tiny_model_dir, prompt_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    train(tiny_model_dir, tmp_path / "qlora", "--load_in_4bit", "true", "--use_cpu", "true", "--max_steps", 3,
          "--learning_rate", 1e-2, "--dtype", "bfloat16")
    run_eval("--base", tiny_model_dir, "--tuned", tmp_path / "qlora", "--prompts", prompt_file,
             "--output_dir", tmp_path / "cmp", "--max_new_tokens", 4)
    meta = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["meta"]
    gap = meta["qlora_gap"]
    # The 4-bit base the run recorded (NF4 of the tiny model's wide random weights) is a coarse copy of the
    # float32 base the adapter is merged into: the logits differ, and the next-token choices agree (31% here)
    # far above the chance of two unrelated models (1 in 32,000).
    assert meta["dtype"] == "float32" and 0 < gap["max_abs_logit_diff"] < 50 and gap["top1_agreement"] > 0.1
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "cmp" / "merged")
    assert not getattr(merged.config, "quantization_config", None)  # plain weights, not 4-bit


@needs_cpu_fp8
def test_fp8_trained_adapter_is_merged_in_full_precision_and_its_gap_reported(tiny_model_dir, adapter_dir, prompt_file,
                                                                              tmp_path, capsys):
    # Training on an FP8 base needs a Hopper GPU; the gap is measured wherever torch runs FP8 GEMMs, the
    # CPU included (emulated). The adapter is a CPU-trained one whose record says fp8_base, as an H100
    # run's would: eval_compare must rebuild the FP8 base the record names, not the bf16 one.
    import shutil

    import yaml

    tuned = shutil.copytree(adapter_dir, tmp_path / "fp8-run")
    config = yaml.safe_load((tuned / "train_config.yaml").read_text())
    (tuned / "train_config.yaml").write_text(yaml.safe_dump({**config, "fp8_base": True}))
    run_eval("--base", tiny_model_dir, "--tuned", tuned, "--prompts", prompt_file, "--output_dir", tmp_path / "cmp",
             "--max_new_tokens", 4)
    meta = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["meta"]
    gap = meta["fp8_gap"]
    assert "qlora_gap" not in meta and "FP8 base + adapter vs merged float32 model" in capsys.readouterr().out
    # e4m3's rounding of the tiny model's wide weights moves its logits (mean 0.22 here; a bf16 base
    # without FP8 would give 0.03), and its next-token choices still mostly agree with the merged fp32
    # model's (77% here; unrelated models: 1 in 32,000)
    assert gap["mean_abs_logit_diff"] > 0.1 and gap["max_abs_logit_diff"] < 50 and gap["top1_agreement"] > 0.5


def test_card_of_an_alpaca_run_carries_its_license_and_scores(tmp_path):
    from alpaca_sft.eval.report import METRICS
    from alpaca_sft.release.card import model_card
    from alpaca_sft.train.run_record import RunRecord

    (tmp_path / "train_config.yaml").write_text("dataset_name: tatsu-lab/alpaca\nload_in_4bit: true\nlora_r: 16\n")
    scores = {name: {key: None for key, _, _ in METRICS} for name in ("base", "tuned")}
    scores["base"]["stopped_by_eos"], scores["tuned"]["stopped_by_eos"] = 0.0, 0.875
    card = model_card("mistralai/Mistral-7B-v0.1", RunRecord.read(tmp_path), scores, "data/eval_prompts.jsonl", "me/m")
    assert card.data.license == "cc-by-nc-4.0" and card.data.datasets == ["tatsu-lab/alpaca"]
    assert "QLoRA adapter" in card.text and "non-commercial" in card.text
    (result,) = card.data.eval_results  # the Hub's model-index: what the comparison measured
    assert result.metric_type == "stopped_by_eos" and result.metric_value == 0.875
