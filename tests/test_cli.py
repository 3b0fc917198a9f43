"""train_sft.py as a user runs it: recipes parse, preview works without weights, bad input fails early.

Most run the command line in this process (train_sft.cli: its exit code, its stdout and stderr); the few
that must see a separate process (its traceback or not, its environment) are marked slow."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml
from conftest import REPO, parse, write_jsonl

import train_sft
from alpaca_sft.train.settings import CPU_OVERRIDES

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.fixture
def run_train(capsys):
    def run(*args):
        capsys.readouterr()
        code = train_sft.cli(list(map(str, args)))
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run


def script(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "train_sft.py"), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_parses_into_the_argument_dataclasses(recipe, tmp_path, tokenizer_dir):
    import torch

    from alpaca_sft.train.checks import check_settings
    from alpaca_sft.train.settings import cpu_overrides, parse_settings

    # Without a GPU, TrainingArguments refuses bf16, the checks refuse 4-bit unless use_cpu is explicit,
    # and Liger's Triton kernels are not installed; everything else is checked as shipped.
    script_args, training_args, model_args = parse_settings(["--config", str(recipe), *cpu_overrides()])
    assert training_args.output_dir.startswith("runs/")
    training_args.output_dir = str(tmp_path / "out")
    assert model_args.model_name_or_path and model_args.use_peft
    assert script_args.overlong_policy == yaml.safe_load(recipe.read_text()).get("overlong_policy", "drop")
    if "qlora" in recipe.name:
        assert model_args.load_in_4bit and model_args.bnb_4bit_quant_type == "nf4"
    assert not training_args.ddp_find_unused_parameters  # no graph search under DDP
    model_args.model_name_or_path = str(tokenizer_dir)  # the Hub cannot be reached from the tests
    script_args.dataset_name = str(REPO / "data" / "alpaca_sample.jsonl")
    if script_args.mix_dataset_name:  # the real-base recipes read files tools/real_data.py writes
        script_args.mix_dataset_name = script_args.dataset_name
    if script_args.fp8_base and not torch.cuda.is_available():  # FP8 GEMMs need a Hopper GPU: that, and nothing else
        from alpaca_sft.train.settings import SettingsError

        with pytest.raises(SettingsError) as err:
            check_settings(script_args, training_args, model_args)
        assert str(err.value).count("\n  - ") == 1 and "fp8_base needs FP8 tensor cores" in str(err.value)
        return
    check_settings(script_args, training_args, model_args)


def test_a_recipe_asking_for_liger_without_it_installed_fails_before_loading(monkeypatch, tmp_path):
    import importlib.util

    from alpaca_sft.train.checks import check_settings
    from alpaca_sft.train.settings import SettingsError, parse_settings

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a))
    args = parse_settings(["--config", str(REPO / "recipes" / "mistral-7b-lora.yaml"), "--bf16", "false", "--use_cpu", "true",
                           "--output_dir", str(tmp_path / "out")])  # Liger left on: what is tested
    assert args[1].use_liger_kernel  # the recipe asks for it
    with pytest.raises(SettingsError, match="use_liger_kernel needs liger-kernel"):
        check_settings(*args)


def test_a_gpu_recipe_on_a_machine_without_one_is_told_what_to_add():
    import torch

    from alpaca_sft.train.settings import SettingsError, parse_settings

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SettingsError, match="this machine has none: to train on the CPU") as err:
        parse_settings(["--config", str(REPO / "recipes" / "mistral-7b-lora.yaml")])
    assert " ".join(CPU_OVERRIDES) in str(err.value)


def test_recipes_exist():
    assert {r.name for r in RECIPES} >= {"tiny-cpu.yaml", "mistral-7b-lora.yaml", "mistral-7b-qlora.yaml",
                                         "mistral-7b-lora-fp8.yaml"}


def test_fp8_base_without_hopper_is_refused_in_one_message_before_weights_load(tmp_path, tokenizer_dir, run_train):
    result = run_train("--config", REPO / "recipes/mistral-7b-lora-fp8.yaml", "--model_name_or_path", tokenizer_dir,
                       "--dataset_name", REPO / "data/alpaca_sample.jsonl", "--output_dir", tmp_path / "out", *CPU_OVERRIDES)
    assert result.returncode == 1
    assert ("fp8_base needs FP8 tensor cores (Hopper: H100, H200, or newer) and this machine has no CUDA GPU: "
            "train a bf16 base (recipes/mistral-7b-lora.yaml)") in result.stderr
    assert not (tmp_path / "out").exists()


def test_preview_prints_marked_examples_and_loads_no_weights(tmp_path, tokenizer_dir, run_train):
    # tokenizer_dir holds a tokenizer and no model: any attempt to load weights would fail.
    out = tmp_path / "out"
    result = run_train(
        "--config", REPO / "recipes/tiny-cpu.yaml", "--model_name_or_path", tokenizer_dir,
        "--output_dir", out, "--preview", 3,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("===== example") == 3
    assert "[[The three primary colors are red, blue and yellow.</s>]]" in result.stdout
    assert "24 rows read, 24 kept" in result.stdout
    rows = [json.loads(line) for line in (out / "preview.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"])
        assert row["labels"][0] == -100 and row["labels"][-1] == 2 == row["input_ids"][-1]
        assert row["trained_text"].endswith("</s>")


def test_bad_row_fails_before_weights_load_and_names_the_row(tmp_path, tokenizer_dir, run_train):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 5}])
    result = run_train(
        "--config", REPO / "recipes/tiny-cpu.yaml", "--model_name_or_path", tokenizer_dir,
        "--dataset_name", data, "--output_dir", tmp_path / "out",
    )
    assert result.returncode == 1
    assert "row 1 (line 2): `output` is int, not a string" in result.stderr


def test_a_full_datasets_cache_is_one_message_saying_where_and_what_to_do(tmp_path, tokenizer_dir, run_train,
                                                                          monkeypatch):
    import errno
    import os

    import datasets
    from datasets.exceptions import DatasetGenerationError

    def cache_on_a_full_disk(*args, **kwargs):  # what datasets raises there (seen on a full tmpfs)
        raise DatasetGenerationError("An error occurred while generating the dataset") from OSError(
            errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(datasets, "load_dataset", cache_on_a_full_disk)
    data = tmp_path / "d.csv"
    data.write_text("instruction,input,output\nName a color.,,Blue\n")
    result = run_train("--config", REPO / "recipes/tiny-cpu.yaml", "--model_name_or_path", tokenizer_dir,
                       "--dataset_name", data, "--output_dir", tmp_path / "out")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (f"No space left on device while datasets wrote its cache of '{data}' in {datasets.config.HF_DATASETS_CACHE} "
            "(") in result.stderr
    assert ("nothing was trained. Free space there, or point the cache at a disk with room "
            "(HF_DATASETS_CACHE=/path/with/room), and run the same command again") in result.stderr


@pytest.mark.parametrize(
    "override,message",
    [
        (["--lora_r", "0"], "lora_r=0"),
        (["--max_length", "0"], "max_length=0"),
        (["--overlong_policy", "truncate"], "--overlong_policy/--overlong-policy: invalid choice: 'truncate'"),
        (["--dataset_name", "missing.jsonl"], "no such file"),
        (["--use_peft", "false", "--load_in_4bit", "true"], "only be trained through adapters"),
        (["--num_train_epochs", "0", "--max_steps", "-1"], "nothing would be trained"),
        (["--learning_rate=-1e-4"], "learning_rate=-0.0001: must be > 0"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size=0: must be >= 1"),
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps=0: must be >= 1"),
        (["--model_name_or_path", "/nonexistent"], "model folder /nonexistent does not exist"),
        (["--model_name_or_path", "someone/tiny-mistral"],
         "someone/tiny-mistral: no such local folder, and not in the local Hub cache (HF_HUB_OFFLINE is set); build the tiny"),
        (["--resume_from_checkpoint", "true"], "no complete checkpoint-* in"),
        (["--fp8_base", "true", "--load_in_4bit", "true"], "fp8_base and load_in_4bit/load_in_8bit are two precisions"),
        (["--fp8_base", "true", "--use_peft", "false"], "fp8_base puts the frozen base in FP8 under LoRA: set use_peft: true"),
        (["--fp8_base", "true", "--dtype", "float32"], "fp8_base: set dtype: bfloat16 (not float32)"),
        (["--fp8_base", "true", "--torch_compile", "true"], "fp8_base compiles its own"),
        (["--trust_remote_code", "true"], "trust_remote_code: this pipeline never runs a model folder's own Python code"),
    ],
)
def test_bad_settings_are_refused_before_weights_load(tmp_path, tokenizer_dir, override, message):
    from alpaca_sft.train.checks import check_settings
    from alpaca_sft.train.settings import SettingsError

    with pytest.raises(SettingsError) as err:  # a choice or a range of the project's own is refused while parsing
        check_settings(*parse("--model_name_or_path", tokenizer_dir, "--output_dir", tmp_path / "out", *override))
    assert message in str(err.value)


def test_a_missing_model_is_a_folder_where_its_first_part_is_one_else_a_hub_id(tmp_path, monkeypatch):
    from alpaca_sft.train.checks import check_settings
    from alpaca_sft.train.settings import SettingsError

    monkeypatch.chdir(tmp_path)  # "build/" exists in a checkout that ran the quickstart, not in a fresh one
    for build_exists, message in ((False, "build/no-such-model: no such local folder, and not in the local Hub cache"),
                                  (True, "model folder build/no-such-model does not exist")):
        if build_exists:
            (tmp_path / "build").mkdir()
        with pytest.raises(SettingsError) as err:
            check_settings(*parse("--model_name_or_path", "build/no-such-model", "--output_dir", tmp_path / "out"))
        assert message in str(err.value)


@pytest.mark.slow
def test_a_bad_setting_ends_the_script_in_one_message_with_nothing_written(tmp_path, tokenizer_dir):
    out = tmp_path / "out"
    result = script("--config", REPO / "recipes/tiny-cpu.yaml", "--model_name_or_path", tokenizer_dir,
                    "--output_dir", out, "--learning_rate=-1", "--per_device_train_batch_size", "0")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "learning_rate=-1.0: must be > 0" in result.stderr and "per_device_train_batch_size=0" in result.stderr
    assert not out.exists()  # no stray train_config.yaml


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, tokenizer_dir, run_train):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    result = run_train("--config", REPO / "recipes/tiny-cpu.yaml", "--model_name_or_path", tokenizer_dir, "--output_dir", a_file)
    assert result.returncode == 1 and "is a file; give a folder" in result.stderr


@pytest.mark.slow
def test_a_hub_model_that_cannot_be_reached_is_said_to_be_unreachable_in_seconds(tmp_path):
    import os
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens: the Hub is unreachable, on any machine
    started = time.time()
    result = script("--config", REPO / "recipes/tiny-cpu.yaml", "--model_name_or_path", "someone/some-model",
                    "--output_dir", tmp_path / "out", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "the Hub cannot be reached to fetch it" in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr
    assert time.time() - started < 30


def test_fsdp_with_a_4bit_base_stored_as_uint8_is_refused_before_loading(tmp_path, tokenizer_dir, run_train, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets for accelerate_configs/fsdp*.yaml
    result = run_train("--config", REPO / "recipes/tiny-cpu.yaml", "--model_name_or_path", tokenizer_dir,
                       "--output_dir", tmp_path / "out", "--load_in_4bit", "true", "--use_cpu", "true")
    assert result.returncode == 1
    assert "add --bnb_4bit_quant_storage bfloat16" in result.stderr


def test_an_unknown_recipe_key_or_flag_is_one_line_naming_it(tmp_path, run_train):
    recipe = tmp_path / "r.yaml"
    recipe.write_text((REPO / "recipes/tiny-cpu.yaml").read_text() + "lora_rnak: 8\n")
    for args in (["--config", recipe], ["--config", REPO / "recipes/tiny-cpu.yaml", "--lerning_rate", "1e-4"]):
        result = run_train(*args)
        assert result.returncode == 1 and result.stderr.count("\n") == 1
        assert ("lora_rnak" if args[1] == recipe else "--lerning_rate") in result.stderr


ACCELERATE_CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.name for p in ACCELERATE_CONFIGS])
def test_every_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.distributed_type


def test_accelerate_configs_cover_the_launch_modes():
    names = {p.stem for p in ACCELERATE_CONFIGS}
    assert names >= {"single_gpu", "multi_gpu", "fsdp", "fsdp_qlora", "multi_node", "cpu_2proc", "cpu_2machines"}


def _nested(tmp_path):
    path = tmp_path / "nested.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    return ["--dataset_name", path]


def _gzipped(tmp_path):
    import gzip

    path = tmp_path / "data.jsonl"
    path.write_bytes(gzip.compress((REPO / "data" / "alpaca_sample.jsonl").read_bytes()))
    return ["--dataset_name", path]


def _tab_in_recipe(tmp_path):
    recipe = tmp_path / "tab.yaml"
    recipe.write_text((REPO / "recipes/tiny-cpu.yaml").read_text().replace("lora_r: 16", "lora_r:\t16\n\tlora_alpha: 3"))
    return ["--config", recipe]


def _model_copy(tmp_path, model_dir, drop=(), corrupt=None):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns(*drop))
    if corrupt:
        (folder / corrupt).write_text('{"model_type": "mistral", ')
    return ["--model_name_or_path", folder]


def _adapter_as_base(tmp_path, model_dir):
    from conftest import train

    train(model_dir, tmp_path / "earlier", "--max_steps", 1)
    return ["--model_name_or_path", tmp_path / "earlier"]


@pytest.mark.parametrize("make,message", [
    (lambda t, m: ["--attn_implementation", "flashy"], "attn_implementation='flashy': use one of"),
    (lambda t, m: _tab_in_recipe(t), "the recipe is not valid YAML"),
    (lambda t, m: _model_copy(t, m, drop=("tokenizer*",)), "has no tokenizer (tokenizer.json"),
    (lambda t, m: _model_copy(t, m, corrupt="config.json"), "config.json is not valid JSON"),
    (lambda t, m: _adapter_as_base(t, m), "is a LoRA adapter (trained on"),
    (lambda t, m: ["--lora_dropout", 2.0], "lora_dropout=2.0: a probability"),
    (lambda t, m: ["--lora_target_modules", "nope"], "lora_target_modules=nope: no linear layer of"),
    (lambda t, m: ["--lora_r", 100000], "lora_r=100000: more than the smallest adapted layer's 32 dimensions"),
    (lambda t, m: ["--max_train_rows", -3], "max_train_rows=-3: must be >= 1"),
    (lambda t, m: ["--save_strategy", "steps", "--save_steps", 0], "save_steps=0 with save_strategy 'steps': no checkpoint"),
    (lambda t, m: ["--dataset_name", REPO / "data"], "is a folder: give one data file"),
    (lambda t, m: _nested(t), "row 1 (line 2): nested too deeply to be a record"),
    (lambda t, m: _gzipped(t), "is gzip-compressed, whatever its name says"),
    (lambda t, m: ["--resume_from_checkpoint", "true", "--overwrite_output_dir", "true"],
     "resume_from_checkpoint and overwrite_output_dir are both set"),
])
def test_a_bad_file_or_setting_is_one_message_before_weights_load(make, message, tiny_model_dir, tmp_path, run_train):
    out = tmp_path / "out"
    args = make(tmp_path, tiny_model_dir)
    if "--resume_from_checkpoint" in args:  # something to resume from
        (out / "checkpoint-1").mkdir(parents=True)
        (out / "checkpoint-1" / "checkpoint.json").write_text("{}")
    config = [] if "--config" in args else ["--config", REPO / "recipes/tiny-cpu.yaml"]
    result = run_train(*config, "--model_name_or_path", tiny_model_dir, "--output_dir", out, *args)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert not (out / "train_config.yaml").exists()


def _folder_with_its_own_code(folder, tokenizer_dir, marker):
    """A model folder that transformers can only load by importing its own module, which writes `marker`."""
    import shutil

    shutil.copytree(tokenizer_dir, folder)
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_lm'\n")
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps({"model_type": "evil_lm", "auto_map": auto_map}))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def test_a_model_folder_that_runs_its_own_code_is_refused_before_anything_loads(tmp_path, tokenizer_dir, monkeypatch,
                                                                                 capsys):
    import eval_compare
    from alpaca_sft.models.sources import model_problem

    marker = tmp_path / "code-ran"
    folder = _folder_with_its_own_code(tmp_path / "evil", tokenizer_dir, marker)
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")  # a user who says yes
    (tmp_path / "tuned").mkdir()
    for cli, args in [(train_sft.cli, ["--config", REPO / "recipes/tiny-cpu.yaml", "--model_name_or_path", folder,
                                       "--output_dir", tmp_path / "out"]),
                      (eval_compare.cli, ["--base", folder, "--tuned", tmp_path / "tuned",
                                          "--prompts", REPO / "data" / "eval_prompts.jsonl"])]:
        capsys.readouterr()
        assert cli(list(map(str, args))) == 1
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "runs its own Python code" in err and "'evil_lm'" in err, err
    assert not asked and not marker.exists()
    # A type transformers has built in loads with its own classes, whatever an auto_map says: not refused.
    known = tmp_path / "known"
    known.mkdir()
    (known / "config.json").write_text(json.dumps({"model_type": "mistral", "auto_map": {"AutoConfig": "evil.X"}}))
    assert model_problem(str(known)) is None


def test_a_setting_that_is_almost_surely_a_mistake_is_warned_with_its_number(tiny_model_dir, tmp_path):
    from alpaca_sft.train.checks import check_settings

    warnings = check_settings(*parse("--model_name_or_path", tiny_model_dir, "--output_dir", tmp_path / "out",
                                     "--learning_rate", 1e6, "--lora_r", 24)).warnings
    assert any("learning_rate=1e+06: LoRA trains at 1e-4 to 1e-3" in w for w in warnings)
    assert any("lora_r=24: more than half the smallest adapted layer's 32 dimensions" in w for w in warnings)
    assert check_settings(*parse("--model_name_or_path", tiny_model_dir, "--output_dir", tmp_path / "out2")).warnings == []


def test_a_setting_the_user_gives_is_the_one_the_trainer_gets_and_a_default_fills_only_the_rest(tiny_model_dir, tmp_path):
    import torch

    from alpaca_sft.train.checks import apply_pipeline_settings, check_settings

    def settled(*flags):
        args = parse("--model_name_or_path", tiny_model_dir, "--output_dir", tmp_path / "out", *flags)
        check_settings(*args)
        apply_pipeline_settings(*args[:2])
        return args[1]

    given = settled("--logging_nan_inf_filter", "true", "--dataloader_pin_memory", "true")
    assert given.logging_nan_inf_filter is True and given.dataloader_pin_memory is True
    unset = settled()  # the pipeline's defaults
    assert unset.logging_nan_inf_filter is False and unset.include_num_input_tokens_seen is True
    assert unset.dataloader_pin_memory is torch.cuda.is_available()


def _recipe_without_validation(tmp_path):
    recipe = tmp_path / "no-validation.yaml"
    recipe.write_text("".join(line for line in (REPO / "recipes/tiny-cpu.yaml").read_text().splitlines(keepends=True)
                              if not line.startswith("validation_size:")))
    return ["--config", recipe]


@pytest.mark.parametrize("make,message", [
    (lambda t: ["--include_num_input_tokens_seen", "no"], "include_num_input_tokens_seen='no': the run's record"),
    (lambda t: ["--validation_size", 0, "--eval_strategy", "steps"],
     "eval_strategy='steps' (command line): there is nothing to evaluate, validation is off"),
    (lambda t: ["--validation_size", 0, "--samples_at_end", 3], "samples_at_end=3 (command line): there is nothing"),
    (lambda t: _recipe_without_validation(t), "eval_strategy='steps' (recipe): there is nothing to evaluate"),
])
def test_a_setting_the_user_gives_that_cannot_work_is_refused_by_name(make, message, tiny_model_dir, tmp_path):
    from alpaca_sft.train.checks import check_settings
    from alpaca_sft.train.settings import SettingsError, parse_settings

    args = make(tmp_path)
    config = [] if "--config" in args else ["--config", REPO / "recipes/tiny-cpu.yaml"]
    with pytest.raises(SettingsError) as err:
        check_settings(*parse_settings(list(map(str, [*config, "--model_name_or_path", tiny_model_dir,
                                                       "--output_dir", tmp_path / "out", *args]))))
    assert message in str(err.value)


def test_validation_size_0_on_the_command_line_turns_off_the_recipes_evaluations(tiny_model_dir, tmp_path):
    from alpaca_sft.train.checks import check_settings

    check_settings(*parse("--model_name_or_path", tiny_model_dir, "--output_dir", tmp_path / "out", "--validation_size", 0))
