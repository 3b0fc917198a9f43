"""eval_compare.py: pairing checks, merge equivalence, the comparison, SQL checks, the Hub push."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, needs_cpu_fp8, write_jsonl
from hub_server import HubServer

import eval_compare
from alpaca_sft.models.tokenizer import load_tokenizer
from alpaca_sft.eval.prompts import EvalPrompt, PromptFileError, read_prompts
from alpaca_sft.eval.scoring import score
from alpaca_sft.eval.sql_check import check_sql
from alpaca_sft.models.generation import Generation
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
    assert list(scores) == ["base", "run"]  # a column per model, the tuned one named by its folder
    base, tuned = scores["base"], scores["run"]
    assert base["stopped_by_eos"] == 0 and base["mean_new_tokens"] == 24
    assert tuned["stopped_by_eos"] >= 0.75  # the three trained prompts stop (the SQL one may not)
    assert tuned["exact_match"] >= 0.75 and base["exact_match"] == 0
    assert base["sql_prompts"] == tuned["sql_prompts"] == 1 and base["sql_executes"] == 0
    assert base["classes"]["eos"] == 0 and tuned["classes"]["eos"] == tuned["counts"]["stopped_by_eos"][0]
    report = json.loads((out / "comparison.json").read_text())
    first = report["prompts"][0]
    assert first["run"]["text"] == THREE[0]["output"] and first["run"]["stop"] == "eos"
    assert first["run"]["answer_class"] == "eos" and first["base"]["answer_class"] in ("ran_on", "looped", "cut")
    assert first["base"]["stop"] == "length" and first["base"]["new_tokens"] == 24
    assert report["models"]["run"]["merge_max_abs_logit_diff"] < 1e-4
    assert report["meta"]["tuned"] == [str(adapter_dir)] and report["models"]["run"]["merged_to"] == str(out / "merged")
    markdown = (out / "comparison.md").read_text()
    assert "| answers that stop by EOS | 0.0% (0.0%–49.0%) |" in markdown and "## train-0" in markdown  # 0 of 4
    assert "## Examples of each answer class" in markdown and "| run on into new prompt blocks (`ran_on`) |" in markdown
    merged = out / "merged"
    assert (merged / "README.md").read_text().startswith("---\nbase_model:")
    assert json.loads((merged / "merge.json").read_text())["merge_max_abs_logit_diff"] < 1e-4  # the seal
    assert sorted(p.name for p in out.iterdir()) == [".lock", "comparison.json", "comparison.md", "merged"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(merged).config.num_hidden_layers == 2


def test_compare_accepts_an_already_merged_model(tiny_model_dir, adapter_dir, prompt_file, tmp_path):
    # the second run also batches another way (--batching compiled: uncompiled on a CPU), to the same answers
    run_eval("--base", tiny_model_dir, "--tuned", adapter_dir, "--prompts", prompt_file, "--output_dir", tmp_path / "a",
             "--max_new_tokens", 8)
    scores = run_eval("--base", tiny_model_dir, "--tuned", tmp_path / "a" / "merged", "--prompts", prompt_file,
                      "--output_dir", tmp_path / "b", "--max_new_tokens", 8, "--batching", "compiled")
    first = json.loads((tmp_path / "a" / "comparison.json").read_text())
    second = json.loads((tmp_path / "b" / "comparison.json").read_text())
    assert [p["run"]["text"] for p in first["prompts"]] == [p["merged"]["text"] for p in second["prompts"]]
    assert [p["base"]["text"] for p in first["prompts"]] == [p["base"]["text"] for p in second["prompts"]]
    assert (first["meta"]["batching"], second["meta"]["batching"]) == ("static", "compiled")
    assert scores["merged"]["prompts"] == 4


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


def test_sql_check_refuses_an_answer_that_is_not_a_read_only_query(tmp_path):
    attached = tmp_path / "x.db"
    result = check_sql(f"ATTACH DATABASE '{attached}' AS p", SCHEMA, SHOWCASE)
    assert result.refused and "ATTACH" in result.refused and not result.executes and result.matches_reference is False
    assert not attached.exists()
    for answer, tried in [
        ("INSERT INTO table_name_12 VALUES ('a', 'b', 'c')", "INSERT table_name_12"),
        ("DELETE FROM table_name_12", "DELETE table_name_12"),
        ("UPDATE table_name_12 SET class = 'x'", "UPDATE table_name_12"),
        ("DROP TABLE table_name_12", "sqlite_master"),
        ("CREATE TABLE other (a VARCHAR)", "sqlite_master"),
        ("PRAGMA writable_schema = 1", "PRAGMA writable_schema"),
        ("SELECT * FROM pragma_database_list", "sqlite_master"),
        ("SELECT load_extension('/tmp/lib')", "FUNCTION load_extension"),
        ("SELECT sql FROM sqlite_master", "READ sqlite_master"),
        (f"VACUUM INTO '{tmp_path / 'copy.db'}'", "ATTACH"),
    ]:
        result = check_sql(answer, SCHEMA, SHOWCASE)
        assert result.refused and tried in result.refused and not result.executes, (answer, result)
    assert not list(tmp_path.iterdir())


def test_sql_check_stops_a_query_that_never_ends():
    start = time.monotonic()
    result = check_sql("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n",
                       SCHEMA, SHOWCASE)
    assert time.monotonic() - start < 3 and not result.executes and "longer than 1 s" in result.refused


def test_sql_check_runs_ordinary_queries_under_its_guard():
    schema = "CREATE TABLE team (id INT, name VARCHAR); CREATE TABLE game (team_id INT, points INT)"
    for query in [
        "SELECT name, SUM(points) FROM team JOIN game ON team.id = game.team_id GROUP BY name",
        "SELECT COUNT(*) FROM game WHERE points > (SELECT AVG(points) FROM game)",
        "SELECT name FROM team WHERE id IN (SELECT team_id FROM game WHERE points > 3) ORDER BY name",
        "WITH best AS (SELECT team_id, MAX(points) AS top FROM game GROUP BY team_id) SELECT COUNT(*) FROM best",
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5) SELECT COUNT(*) FROM n",
        "SELECT UPPER(name), LENGTH(name), ROUND(AVG(points), 1) FROM team, game GROUP BY name",
    ]:
        result = check_sql(query, schema, query)
        assert result.executes and result.matches_reference and result.refused is None, (query, result)
    summary, _ = score([EvalPrompt("a", "p", "SELECT 1", schema), EvalPrompt("b", "p", "SELECT 1", schema)],
                       [Generation("DELETE FROM game", "eos", 3, 0.1), Generation("SELECT 1", "eos", 2, 0.1)])
    assert summary["sql_refused"] == 1 and summary["sql_executes"] == 0.5


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
    # A schema SQLite cannot be given would fail every model's SQL alike: the row is at fault, not the models
    ('{"question": "Which a?", "context": "the table of cities"}\n',
     r"line 1: `context`: the schema is not SQL that sqlglot parses \(Invalid expression / Unexpected token. Line 1, Col: 12.\)"),
    ('{"prompt": "p", "schema": "SELECT 1"}\n', "line 1: `schema`: the schema holds no CREATE TABLE with columns"),
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
    # The adapter's matrices are checked against the base's layers (its config alone would pass: same model type)
    with pytest.raises(PairError, match=re.escape(f"was not trained on --base {other}: base_model.model.model.layers.0."
                                                  "mlp.down_proj.lora_A.weight has shape [16, 128], which does not fit")):
        inspect_pair(str(other), adapter_dir)
    # The same shape with other weights (in life: the Instruct model, or another fine-tune) is refused too...
    twin = build_random_mistral(tmp_path / "twin", seed=1)
    with pytest.raises(PairError, match="makes a model nobody trained.*--allow_other_base"):
        inspect_pair(str(twin), adapter_dir)
    assert inspect_pair(str(twin), adapter_dir, allow_other_base=True).is_adapter  # ...unless asked for
    # ...while the same weights in another folder are the same base.
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert inspect_pair(str(copy), adapter_dir).is_adapter


@pytest.mark.parametrize("edit,named", [
    ({"lora_alpha": 320}, "lora_alpha is 320 but the run trained with lora_alpha 32"),
    ({"target_modules": ["q_proj"]}, "target_modules is [q_proj] but its tensors also adapt down_proj, gate_proj, k_proj"),
    ({"r": 8}, "r is 8 but the run trained with lora_r 16; r is 8 but its tensors have rank 16"),
])
def test_an_edited_adapter_config_is_refused_by_name_before_anything_loads(tiny_model_dir, adapter_dir, tmp_path, edit,
                                                                           named):
    import shutil

    for with_record in (True, False):  # an adapter made elsewhere has no train_config.yaml: its tensors still judge it
        tuned = shutil.copytree(adapter_dir, tmp_path / f"tuned-{with_record}", ignore=shutil.ignore_patterns("comparison*"))
        if not with_record:
            (tuned / "train_config.yaml").unlink()
        config = json.loads((tuned / "adapter_config.json").read_text())
        (tuned / "adapter_config.json").write_text(json.dumps({**config, **edit}))
        if "lora_alpha" in edit and not with_record:  # nothing stored says what the scale was: its own config stands
            assert inspect_pair(str(tiny_model_dir), tuned).is_adapter
            continue
        with pytest.raises(PairError) as err:
            inspect_pair(str(tiny_model_dir), tuned)
        expected = named if with_record else named.split("; ")[-1]
        assert expected in str(err.value) and "restore the adapter_config.json saved with it" in str(err.value)


def test_an_interrupted_run_points_to_its_newest_complete_checkpoint(tiny_model_dir, adapter_dir, tmp_path):
    import shutil

    from alpaca_sft.run_folder.layout import SEAL

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
    report = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    meta, gap = report["meta"], report["models"]["qlora"]["qlora_gap"]
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
    model = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["models"]["fp8-run"]
    gap = model["fp8_gap"]
    assert "qlora_gap" not in model and "fp8-run: FP8 base + adapter vs merged float32 model" in capsys.readouterr().out
    # e4m3's rounding of the tiny model's wide weights moves its logits (mean 0.22 here; a bf16 base
    # without FP8 would give 0.03), and its next-token choices still mostly agree with the merged fp32
    # model's (77% here; unrelated models: 1 in 32,000)
    assert gap["mean_abs_logit_diff"] > 0.1 and gap["max_abs_logit_diff"] < 50 and gap["top1_agreement"] > 0.5


def test_card_of_an_alpaca_run_carries_its_license_and_scores(tmp_path):
    from alpaca_sft.eval.report import METRICS
    from alpaca_sft.release.card import model_card
    from alpaca_sft.run_folder.record import RunRecord

    (tmp_path / "train_config.yaml").write_text("dataset_name: tatsu-lab/alpaca\nload_in_4bit: true\nlora_r: 16\n")
    scores = {name: {key: None for key, _, _ in METRICS} for name in ("base", "tuned")}
    scores["base"]["stopped_by_eos"], scores["tuned"]["stopped_by_eos"] = 0.0, 0.875
    card = model_card("mistralai/Mistral-7B-v0.1", RunRecord.read(tmp_path), scores, "data/eval_prompts.jsonl", "me/m")
    assert card.data.license == "cc-by-nc-4.0" and card.data.datasets == ["tatsu-lab/alpaca"]
    assert "QLoRA adapter" in card.text and "non-commercial" in card.text
    (result,) = card.data.eval_results  # the Hub's model-index: what the comparison measured
    assert result.metric_type == "stopped_by_eos" and result.metric_value == 0.875


def test_a_run_record_reads_the_base_precision_and_lora_a_run_trained_with(tmp_path):
    from alpaca_sft.run_folder.record import RunRecord

    (tmp_path / "train_config.yaml").write_text("fp8_base: true\nfp8_layers: [q_proj, v_proj]\ndtype: bfloat16\n"
                                                "lora_r: 8\nlora_target_modules: all-linear\n")
    (tmp_path / "run_summary.json").write_text(json.dumps({"base_fingerprint": "abc", "resumed_with_changes": ["seed"]}))
    record = RunRecord.read(tmp_path)
    # a setting the record lacks is the default the run had: fp8_input_grad came later, e4m3 before it
    assert record.precision.kind == "FP8" and record.precision.fp8_layers == ("q_proj", "v_proj")
    assert record.precision.fp8_input_grad == "fp8" and record.lora.r == 8 and record.lora.lora_alpha == 32
    assert record.base_fingerprint == "abc" and record.summary.resumed_with_changes == ("seed",)
    elsewhere = RunRecord.read(tmp_path / "missing")  # an adapter train_sft.py did not make
    assert elsewhere.precision is elsewhere.lora is elsewhere.summary is None and elsewhere.settings == {}


# Several tuned models in one call; the comparison's folder (one run at a time, nothing half-written looking
# whole); what cannot be run refused before anything loads.

def cli(capsys, *args):
    """eval_compare's command line in this process: (exit code, stdout, stderr); an interrupt must not escape."""
    try:
        code = eval_compare.cli(list(map(str, args)))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped eval_compare.cli")
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def other_adapter(adapter_dir, tmp_path_factory):
    """Another adapter for the same base, in a folder named like the first's: B = 0, as PEFT initializes it (an
    untrained run: its merged model is the base)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(adapter_dir, tmp_path_factory.mktemp("other") / "run")
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: v * 0 if ".lora_B." in k else v for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    return folder


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_several_tuned_models_are_compared_in_one_call_on_one_base_generation(tiny_model_dir, adapter_dir, other_adapter,
                                                                             prompt_file, tmp_path, monkeypatch, capsys):
    sql = write_jsonl(tmp_path / "sql.jsonl", [{"question": "How many heads are older than 56?",
                                                "context": "CREATE TABLE head (age INTEGER)",
                                                "answer": "SELECT COUNT(*) FROM head WHERE age > 56"}])
    calls, generate = [], eval_compare.generate
    monkeypatch.setattr(eval_compare, "generate", lambda model, tokenizer, texts, *rest: calls.append(len(texts))
                        or generate(model, tokenizer, texts, *rest))
    out = tmp_path / "cmp"
    scores = run_eval("--base", tiny_model_dir, "--tuned", adapter_dir, other_adapter, "--prompts", prompt_file, sql,
                      "--output_dir", out, "--max_new_tokens", 12)
    first, second = f"{adapter_dir.parent.name}-run", f"{other_adapter.parent.name}-run"  # both folders are "run"
    assert list(scores) == ["base", first, second] and calls == [5, 5, 5]  # the base generated once
    assert capsys.readouterr().out.count("generating for 5 prompts") == 3
    report = json.loads((out / "comparison.json").read_text())
    assert report["meta"]["tuned"] == [str(adapter_dir), str(other_adapter)]
    for name in (first, second):
        assert report["models"][name]["merged_to"] == str(out / "merged" / name)
        assert {"README.md", "merge.json", "model.safetensors", "config.json"} <= set(os.listdir(out / "merged" / name))
        assert list(scores[name]["groups"]) == ["prompts", "sql"] and scores[name]["groups"]["sql"]["prompts"] == 1
    assert report["prompts"][0][first]["text"] == THREE[0]["output"]  # each model answers as itself
    assert [p[second]["text"] for p in report["prompts"]] == [p["base"]["text"] for p in report["prompts"]]
    assert {(t["a"], t["b"]) for t in report["paired"]} == {("base", first), ("base", second), (first, second)}
    assert {t["group"] for t in report["paired"]} == {"all", "prompts", "sql"}
    markdown = (out / "comparison.md").read_text()
    assert f"| metric | prompts | base | {first} | {second} |" in markdown
    assert "| answers that stop by EOS | sql (1) | 0.0% (0.0%–79.3%) |" in markdown  # a row per prompt file


def test_several_tuned_models_need_an_output_dir_and_cannot_be_pushed(capsys):
    for argv, message in [
        (["--tuned", "a", "b"], "with several --tuned, give --output_dir"),
        (["--tuned", "a", "b", "--output_dir", "o", "--push_to_hub", "me/m"], "--push_to_hub uploads one merged model"),
        (["--tuned", "a", "./a", "--output_dir", "o"], "--tuned names one folder more than once"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            eval_compare.parse_args(["--base", "b", *argv])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_second_run_into_a_folder_in_use_is_refused_before_generating(tiny_model_dir, adapter_dir, prompt_file,
                                                                        tmp_path, capsys):
    from alpaca_sft.run_folder.lock import OutputDirLock

    out = tmp_path / "cmp"
    lock = OutputDirLock(out).acquire()  # another eval_compare.py writing there
    try:
        code, said, err = cli(capsys, "--base", tiny_model_dir, "--tuned", adapter_dir, "--prompts", prompt_file,
                              "--output_dir", out, "--max_new_tokens", 4)
    finally:
        lock.release()
    assert code == 1 and f"output_dir={out} is in use by another run (pid {os.getpid()}" in err
    assert "generating" not in said and os.listdir(out) == [".lock"]


def test_a_full_disk_during_the_merged_save_ends_in_one_message(tiny_model_dir, adapter_dir, prompt_file, tmp_path,
                                                                 monkeypatch, capsys):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):  # what safetensors raises on a full disk (its message carries the errno)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    out = tmp_path / "cmp"
    code, _, err = cli(capsys, "--base", tiny_model_dir, "--tuned", adapter_dir, "--prompts", prompt_file,
                       "--output_dir", out, "--max_new_tokens", 4)
    assert code == 1 and "Traceback" not in err
    assert (f"\nerror: No space left on device: nothing of this run was kept in {out}, which holds no complete "
            "comparison; this run's temporary files are removed. Free space on its disk and run again:\n"
            "  python eval_compare.py --base") in err
    assert os.listdir(out) == [".lock"]


@pytest.mark.parametrize("where", ["merge", "generate"])
def test_ctrl_c_during_the_merge_or_a_generation_ends_in_one_message(where, tiny_model_dir, adapter_dir, prompt_file,
                                                                     tmp_path, monkeypatch, capsys):
    real, calls = getattr(eval_compare, where), []

    def interrupted(*args, **kwargs):
        calls.append(where)
        if where == "merge" or len(calls) == 2:  # the merge, or the tuned model's generation after it
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(eval_compare, where, interrupted)
    out = tmp_path / "cmp"
    code, _, err = cli(capsys, "--base", tiny_model_dir, "--tuned", adapter_dir, "--prompts", prompt_file,
                       "--output_dir", out, "--max_new_tokens", 4)
    assert code == 130 and "Traceback" not in err
    assert err.endswith(f"\ninterrupted: nothing of this run was kept in {out}, which holds no complete comparison; "
                           f"this run's temporary files are removed. Run it again:\n  python eval_compare.py --base "
                           f"{tiny_model_dir} --tuned {adapter_dir} --prompts {prompt_file} --output_dir {out} "
                           "--max_new_tokens 4\n")
    assert os.listdir(out) == [".lock"]


def test_an_output_dir_that_cannot_be_written_is_refused_before_anything_loads(tiny_model_dir, adapter_dir, prompt_file,
                                                                               tmp_path, capsys):
    blocked = tmp_path / "a-file" / "cmp"
    blocked.parent.write_text("")
    code, said, err = cli(capsys, "--base", tiny_model_dir, "--tuned", adapter_dir, "--prompts", prompt_file,
                          "--output_dir", blocked)
    assert code == 1 and err.startswith(f"error: cannot write to --output_dir {blocked}: Not a directory")
    assert "generating" not in said and "Traceback" not in err
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    try:
        (read_only / "probe").touch()
        return  # root writes whatever the mode says: the folder in a file above stands for this case here
    except PermissionError:
        pass
    code, said, err = cli(capsys, "--base", tiny_model_dir, "--tuned", adapter_dir, "--prompts", prompt_file,
                          "--output_dir", read_only)
    assert code == 1 and err.startswith(f"error: cannot write to --output_dir {read_only}: Permission denied")


def test_a_merged_model_not_completely_written_is_refused_before_the_base_generates(tiny_model_dir, prompt_file,
                                                                                    tmp_path, capsys):
    import shutil

    out = tmp_path / "cmp"
    (out / "merged").parent.mkdir()
    (out / "comparison.json").write_text("{}")
    cases = [  # (the folder given as --tuned, what is said)
        (shutil.copytree(tiny_model_dir, out / "merged"), "was not completely written by eval_compare.py (it has no merge.json"),
        (shutil.copytree(tiny_model_dir, out / ".tmp-4242-merged"), "is a merged model an eval_compare.py run had not finished"),
        (shutil.copytree(tiny_model_dir, tmp_path / "model"), "holds the temporary files of a save that was stopped"),
    ]
    (cases[2][0] / ".tmpX7f3Qa").write_bytes(b"\0")  # safetensors writes there, and renames when whole
    for folder, message in cases:
        code, said, err = cli(capsys, "--base", tiny_model_dir, "--tuned", folder, "--prompts", prompt_file,
                              "--output_dir", tmp_path / "b", "--max_new_tokens", 4)
        assert code == 1 and message in err and "generating" not in said, (folder, err)


def test_an_output_dir_that_is_a_models_or_holds_what_is_not_ours_is_refused(tiny_model_dir, adapter_dir, prompt_file,
                                                                              tmp_path, capsys):
    import shutil

    foreign = tmp_path / "mine"
    (foreign / "merged").mkdir(parents=True)
    (foreign / "merged" / "notes.txt").write_text("the user's")
    merged = shutil.copytree(tiny_model_dir, tmp_path / "cmp" / "merged")
    (merged / "merge.json").write_text("{}")
    for out, tuned, message in [
        (adapter_dir / "cmp", adapter_dir, f"--output_dir {adapter_dir / 'cmp'} is inside --tuned {adapter_dir}"),
        (tmp_path / "cmp", merged, f"--output_dir {tmp_path / 'cmp'} holds --tuned {merged}"),
        (foreign, adapter_dir, f"{foreign / 'merged'} is not a merged model that eval_compare.py finished"),
    ]:
        code, said, err = cli(capsys, "--base", tiny_model_dir, "--tuned", tuned, "--prompts", prompt_file,
                              "--output_dir", out, "--max_new_tokens", 4)
        assert code == 1 and message in err and "generating" not in said, err
    assert not (adapter_dir / "cmp").exists() and os.listdir(foreign / "merged") == ["notes.txt"]


def test_prompts_or_new_tokens_beyond_the_context_are_refused_before_anything_loads(tiny_model_dir, adapter_dir,
                                                                                     prompt_file, tmp_path):
    from alpaca_sft.eval.prompts import ContextError

    long = write_jsonl(tmp_path / "long.jsonl", [{"id": "short", "prompt": "Hi"}, {"id": "essay", "prompt": "word " * 5000}])
    with pytest.raises(ContextError, match=r"1 prompt\(s\) fill the model's context of 4,096 tokens "
                                           r"\(max_position_embeddings\) or more: long line 2 \(essay: 5,0\d\d tokens\)"):
        run_eval("--base", tiny_model_dir, "--tuned", adapter_dir, "--prompts", long, "--output_dir", tmp_path / "cmp")
    with pytest.raises(ContextError, match=r"--max_new_tokens 5,000 is beyond the model's context of 4,096 tokens "
                                           r"\(max_position_embeddings\): give at most 4,0\d\d \(the context less the longest prompt\)"):
        run_eval("--base", tiny_model_dir, "--tuned", adapter_dir, "--prompts", prompt_file, "--output_dir",
                 tmp_path / "cmp", "--max_new_tokens", 5000)
    assert not (tmp_path / "cmp").exists()


def test_answers_that_could_run_past_the_context_are_warned_with_the_numbers(tokenizer):
    from alpaca_sft.eval.prompts import EvalPrompt, check_lengths

    prompts = [EvalPrompt("a", "word " * 3000, group="g", line=1), EvalPrompt("b", "Hi", group="g", line=2)]
    longest = len(tokenizer(prompts[0].prompt)["input_ids"])
    assert check_lengths(prompts, tokenizer, 4096, 4096 - longest) is None
    assert check_lengths(prompts, tokenizer, 4096, 2000) == (
        "warning: 1 of 2 prompts plus --max_new_tokens 2,000 exceed the model's context of 4,096 tokens "
        "(max_position_embeddings): their answers can run past the positions the model was trained on; "
        f"--max_new_tokens {4096 - longest:,} keeps every answer inside")


def fault(point, *args):
    return subprocess.run([sys.executable, str(REPO / "tests" / "eval_fault_worker.py"), point, *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_kill_during_the_merged_save_leaves_nothing_that_looks_whole(tiny_model_dir, adapter_dir, prompt_file, tmp_path,
                                                                       capsys):
    out = tmp_path / "cmp"
    flags = ["--base", tiny_model_dir, "--prompts", prompt_file, "--max_new_tokens", 4]
    killed = fault("inside_merged_save", *flags, "--tuned", adapter_dir, "--output_dir", out)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "merged").exists() and not (out / "comparison.json").exists()
    (half,) = [p for p in out.iterdir() if (p / "config.json").is_file()]  # the merged model as the kill left it
    code, said, err = cli(capsys, *flags, "--tuned", half, "--output_dir", tmp_path / "b")
    assert code == 1 and "had not finished writing" in err and "generating" not in said
    code, said, _ = cli(capsys, *flags, "--tuned", adapter_dir, "--output_dir", out)  # the next run into the folder
    assert code == 0 and f"removed what a stopped run left: {half.name}" in said
    assert not list(out.rglob(".tmp*")) and (out / "merged" / "merge.json").is_file()


@pytest.mark.slow
def test_a_rerun_killed_while_writing_its_report_leaves_the_earlier_comparison_whole(tiny_model_dir, adapter_dir,
                                                                                    other_adapter, prompt_file, tmp_path):
    import hashlib

    out = tmp_path / "cmp"
    flags = ["--base", tiny_model_dir, "--prompts", prompt_file, "--output_dir", out, "--max_new_tokens", 4]
    run_eval(*flags, "--tuned", adapter_dir)

    def state():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
                if p.is_file() and p.name != ".lock"}  # the lock names its last holder

    before = state()
    killed = fault("inside_report", *flags, "--tuned", other_adapter)  # another run, after its merge and generations
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = state()
    leftovers = [p for p in left if p.name.startswith(".tmp") or p.parent.name.startswith(".tmp")]
    assert {p: h for p, h in left.items() if p not in leftovers} == before  # the earlier comparison and merged model
    assert leftovers  # the killed run's own files, under temporary names, which the next run removes
