"""Every setting that can be checked without weights, at once, before any weights load: one SettingsError
listing each problem and its fix. Each check below returns the problems of one concern; none changes
anything. Then apply_pipeline_settings: the defaults the pipeline fills in on top of any recipe, once the checks pass,
never over a value the user gave (one that cannot work is refused by name instead)."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.trainer_utils import IntervalStrategy

from ..data.records import LOCAL_SUFFIXES, dataset_problem
from ..kernels.attention import DOCUMENT_FLEX
from ..kernels.fp8_base import fp8_gemm_problem
from ..launch import fsdp_enabled, launched_processes
from ..models.sources import model_problem
from ..run_folder.layout import holds_a_run
from .checkpoints import resume_target
from .output_dir import folder_problem
from .settings import GIVEN_IN, ScriptArguments, SettingsError, settings_error


@dataclass
class Checked:
    """What the checks found besides problems: the warnings (settings that are almost surely mistakes, with the
    number that makes them so) and the checkpoint a resume continues from (train/checkpoints.py), resolved once."""

    warnings: list[str]
    resume_from: str | None


def check_settings(script_args, training_args, model_args) -> Checked:
    """Raises one SettingsError listing every problem; returns the warnings and the resume target."""
    problems = []
    try:
        resume = resume_target(training_args)
    except SettingsError as err:
        problems.append(str(err))
        resume = None
    for check in (_launch_problems(training_args), _source_problems(script_args, training_args, model_args),
                  _validation_problems(script_args), _training_problems(training_args),
                  _adapter_problems(script_args, training_args, model_args), _tracker_problems(training_args),
                  _output_problems(script_args, training_args, model_args, resume),
                  _pipeline_setting_problems(script_args, training_args)):
        problems += check
    fp8_layers = script_args.fp8_layers if script_args.fp8_base else None
    shape_problems, warnings = _model_shape_problems(model_args, fp8_layers) if not problems else ([], [])
    problems += shape_problems
    if problems:
        raise settings_error(problems)
    return Checked(warnings + _warnings(training_args), resume)


def _missing(package: str) -> bool:
    return importlib.util.find_spec(package) is None


def _launch_problems(training_args) -> list[str]:
    from accelerate import PartialState

    if launched_processes() > PartialState().num_processes:
        return [f"{launched_processes()} processes were launched but not joined into one group, so each would train "
                "alone; on a machine without a GPU add --use_cpu true"]
    return []


def _source_problems(script_args, training_args, model_args) -> list[str]:
    problems = []
    if training_args.trust_remote_code:  # SFTConfig's: every load here passes trust_remote_code=False
        problems.append("trust_remote_code: this pipeline never runs a model folder's own Python code; use a base "
                        "whose type transformers has built in, and leave trust_remote_code false")
    if not model_args.model_name_or_path:
        problems.append("model_name_or_path is not set: give a Hub id or a local model folder")
    elif problem := model_problem(model_args.model_name_or_path, model_args.model_revision, need_tokenizer=True):
        problems.append(f"model: {problem}")
    for setting in ("dataset_name", "mix_dataset_name"):
        name = getattr(script_args, setting)
        if name is None:
            continue
        source = Path(name)
        if source.is_dir():
            problems.append(f"{setting}={name} is a folder: give one data file (.json/.jsonl/.parquet/.csv) or a Hub id")
        elif source.suffix in LOCAL_SUFFIXES and not source.is_file():
            problems.append(f"{setting}={name}: no such file")
        elif source.suffix not in LOCAL_SUFFIXES and (problem := dataset_problem(name)):
            problems.append(f"{setting}: {problem}")
    return problems


def _validation_problems(script_args) -> list[str]:
    file = script_args.validation_file
    if file and (Path(file).suffix not in LOCAL_SUFFIXES or not Path(file).is_file()):
        return [f"validation_file={file}: no such .json/.jsonl/.parquet/.csv file"]
    return []


def _training_problems(training_args) -> list[str]:
    problems = []
    if training_args.max_length is not None and training_args.max_length <= 0:
        problems.append(f"max_length={training_args.max_length}: must be a positive number of tokens")
    if training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        problems.append(f"num_train_epochs={training_args.num_train_epochs} and no max_steps: nothing would be trained; "
                        "set num_train_epochs > 0 or max_steps > 0")
    if training_args.learning_rate <= 0:
        problems.append(f"learning_rate={training_args.learning_rate}: must be > 0")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, name) <= 0:
            problems.append(f"{name}={getattr(training_args, name)}: must be >= 1")
    if training_args.save_strategy == "steps" and training_args.save_steps <= 0:
        problems.append(f"save_steps={training_args.save_steps:g} with save_strategy 'steps': no checkpoint would ever be "
                        "written; give a number of steps, or save_strategy: 'no'")
    if training_args.use_liger_kernel and _missing("liger_kernel"):
        problems.append("use_liger_kernel needs liger-kernel: pip install liger-kernel (or set it false)")
    return problems


def _adapter_problems(script_args, training_args, model_args) -> list[str]:
    """LoRA, the base's precision (bf16, 4-bit, 8-bit, FP8) and what each needs of the machine."""
    problems = []
    attention = model_args.attn_implementation
    known = {"auto", "eager", DOCUMENT_FLEX, *ALL_ATTENTION_FUNCTIONS.keys()}
    if attention not in (None, *known) and "/" not in attention:  # org/name: a Hub kernel, transformers' to judge
        problems.append(f"attn_implementation={attention!r}: use one of {', '.join(sorted(known))}")
    if model_args.use_peft and not 0 <= model_args.lora_dropout < 1:
        problems.append(f"lora_dropout={model_args.lora_dropout}: a probability, from 0 up to (not including) 1")
    if model_args.use_peft and model_args.lora_r <= 0:
        problems.append(f"lora_r={model_args.lora_r}: the LoRA rank must be > 0")
    if model_args.use_peft and model_args.lora_alpha <= 0:
        problems.append(f"lora_alpha={model_args.lora_alpha}: must be > 0")
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if model_args.load_in_4bit and model_args.load_in_8bit:
        problems.append("load_in_4bit and load_in_8bit are both set: pick one")
    if quantized and _missing("bitsandbytes"):
        problems.append("load_in_4bit/load_in_8bit need bitsandbytes: pip install bitsandbytes")
    if quantized and not model_args.use_peft:
        problems.append("a quantized base can only be trained through adapters: set use_peft: true")
    if model_args.load_in_4bit and not torch.cuda.is_available() and not training_args.use_cpu:
        problems.append("load_in_4bit without a CUDA GPU: bitsandbytes runs NF4 on the CPU ~100x slower; "
                        "set use_cpu: true if that is really what you want")
    if fsdp_enabled() and model_args.load_in_4bit and model_args.bnb_4bit_quant_storage not in ("bfloat16", "float16", "float32"):
        problems.append("FSDP with a 4-bit base: FSDP shards only floating-point tensors, so store the 4-bit weights "
                        "in one: add --bnb_4bit_quant_storage bfloat16")
    if script_args.fp8_base:
        if not model_args.use_peft:
            problems.append("fp8_base puts the frozen base in FP8 under LoRA: set use_peft: true")
        if quantized:
            problems.append("fp8_base and load_in_4bit/load_in_8bit are two precisions for the same base: pick one")
        if model_args.dtype != "bfloat16":
            problems.append(f"fp8_base: set dtype: bfloat16 (not {model_args.dtype}); the FP8 GEMMs write bf16")
        if fsdp_enabled():
            problems.append("fp8_base runs on one GPU or under DDP (accelerate_configs/multi_gpu.yaml), not FSDP")
        if training_args.torch_compile:
            problems.append("fp8_base compiles its own quantization kernels: set torch_compile: false")
        if problem := fp8_gemm_problem(training_args.use_cpu):
            problems.append(f"fp8_base needs FP8 tensor cores (Hopper: H100, H200, or newer) and {problem}: "
                            "train a bf16 base (recipes/mistral-7b-lora.yaml) or a 4-bit one (recipes/mistral-7b-qlora.yaml)")
    return problems


def _model_shape_problems(model_args, fp8_layers: list[str] | None = None) -> tuple[list[str], list[str]]:
    """From the base's config alone (its layers built on the meta device): LoRA target modules that match no
    layer, FP8 layers that name no adapted one, and a rank no adapted layer can hold. Skipped where the config
    cannot be read without a download."""
    if not model_args.use_peft:
        return [], []
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                            trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception:  # a Hub model not downloaded yet: the loader will say what is wrong
        return [], []
    targets = model_args.lora_target_modules
    if targets is None:
        return [], []  # PEFT's own per-architecture default
    layers = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if targets == "all-linear" or targets == ["all-linear"]:
        matched = {n: m for n, m in layers.items() if m is not model.get_output_embeddings()}
    else:
        wanted = [targets] if isinstance(targets, str) else list(targets)
        matched = {n: m for n, m in layers.items()
                   if any(n == t or n.endswith("." + t) or (isinstance(targets, str) and re.fullmatch(t, n)) for t in wanted)}
    if not matched:
        names = sorted({n.rsplit(".", 1)[-1] for n in layers})
        return [f"lora_target_modules={targets}: no linear layer of {model_args.model_name_or_path} matches "
                f"(its layers: {', '.join(names)})"], []
    problems = _fp8_layer_problems(fp8_layers, matched)
    smallest = min(min(m.in_features, m.out_features) for m in matched.values())
    if model_args.lora_r > smallest:
        return problems + [f"lora_r={model_args.lora_r}: more than the smallest adapted layer's {smallest} dimensions, "
                           "so the update is no longer low-rank (the full weight would be smaller); LoRA ranks are 8-64"], []
    if model_args.lora_r > smallest // 2:
        return problems, [f"lora_r={model_args.lora_r}: more than half the smallest adapted layer's {smallest} "
                          "dimensions: an adapter that large costs nearly what full fine-tuning does"]
    return problems, []


def _fp8_layer_problems(fp8_layers: list[str] | None, adapted: dict) -> list[str]:
    """fp8_layers' names that match no adapted layer: a misspelt one would leave its layers in bf16, unsaid."""
    names = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    unknown = [name for name in fp8_layers or () if name not in names]
    if unknown:
        return [f"fp8_layers: {', '.join(unknown)} is not an adapted layer of this model; its adapted layers are "
                f"{', '.join(names)}"]
    return []


def _warnings(training_args) -> list[str]:
    if training_args.learning_rate > 0.1:
        return [f"learning_rate={training_args.learning_rate:g}: LoRA trains at 1e-4 to 1e-3; at more than 0.1 the loss "
                "is likely to diverge (the NaN guard then stops the run)"]
    return []


def _tracker_problems(training_args) -> list[str]:
    trackers, problems = set(training_args.report_to or []), []
    if "tensorboard" in trackers and _missing("tensorboard") and _missing("tensorboardX"):
        problems.append("report_to tensorboard needs tensorboard: pip install -e \".[track]\" (or pip install tensorboard)")
    if "wandb" in trackers and _missing("wandb"):
        problems.append("report_to wandb needs wandb: pip install wandb")
    return problems


def _output_problems(script_args, training_args, model_args, resume) -> list[str]:
    output_dir = Path(training_args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        return [f"output_dir={output_dir} is a file; give a folder"]
    if script_args.overwrite_output_dir and resume:
        return ["resume_from_checkpoint and overwrite_output_dir are both set: overwriting removes the checkpoints "
                "a resume would read; pick one"]
    if problem := folder_problem(output_dir, model_args.model_name_or_path):  # before anything is written or removed
        return [problem]
    if holds_a_run(output_dir) and not (script_args.overwrite_output_dir or resume or script_args.preview):
        return [f"output_dir={output_dir} already holds a run: pass --resume_from_checkpoint true to continue it, "
                "--overwrite_output_dir true to replace it, or another --output_dir"]
    return []


def _pipeline_setting_problems(script_args, training_args) -> list[str]:
    """The user's values that apply_pipeline_settings would otherwise have to overrule, refused by name."""
    problems = []
    if not script_args.validates:
        off_since = GIVEN_IN[script_args.given_in("validation_size")]
        for name, value in _evaluating(script_args, training_args):
            # validation_size 0 on the command line turns off what the recipe set to evaluate (a flag overrides the
            # recipe); a setting given as late as it, or later, contradicts it
            if GIVEN_IN[script_args.given_in(name)] >= max(off_since, GIVEN_IN["recipe"]):
                problems.append(f"{name}={value!r} ({script_args.given_in(name)}): there is nothing to evaluate, validation "
                                "is off (validation_size 0, no validation_file); turn it off, or give a validation_size")
    counted = training_args.include_num_input_tokens_seen
    if script_args.given_in("include_num_input_tokens_seen") != "default" and counted in ("no", False):
        problems.append("include_num_input_tokens_seen='no': the run's record and the console's tokens/s read the "
                        "Trainer's count of input tokens, which this turns off; set it true, or leave it unset")
    return problems


def _evaluating(script_args, training_args) -> list[tuple[str, object]]:
    """The settings that evaluate or sample on the validation examples, where they are on."""
    values = {"eval_strategy": IntervalStrategy(training_args.eval_strategy).value,
              "eval_on_start": training_args.eval_on_start, "samples_at_end": script_args.samples_at_end}
    return [(name, value) for name, value in values.items() if value not in ("no", False, 0)]


def apply_pipeline_settings(script_args: ScriptArguments, training_args) -> None:
    """The pipeline's own defaults on top of any recipe, once the settings are checked: each fills a setting the user
    left unset, or one a later setting of the user's overrides (check_settings refused a user's value that cannot
    work, naming it)."""
    if not script_args.validates:  # validation_size: 0 alone turns validation off, the recipe's evaluations with it
        training_args.eval_strategy, training_args.eval_on_start, script_args.samples_at_end = IntervalStrategy.NO, False, 0
    if training_args.hub_token:  # kept out of every saved config and log: huggingface_hub reads it from HF_TOKEN
        os.environ["HF_TOKEN"], training_args.hub_token = training_args.hub_token, None
    if script_args.given_in("logging_nan_inf_filter") == "default":
        training_args.logging_nan_inf_filter = False  # a NaN loss shows in the log as it is, not as the running mean
    # The Trainer's own token counter is what a checkpoint keeps: the run's record spans a resume.
    if script_args.given_in("include_num_input_tokens_seen") == "default":
        # all tokens, packed rows being padding-free; True, not "all": train_config.yaml, read back as a recipe,
        # gives this field to a parser that takes only a bool
        training_args.include_num_input_tokens_seen = True
    if not torch.cuda.is_available() and script_args.given_in("dataloader_pin_memory") == "default":
        training_args.dataloader_pin_memory = False  # nothing to pin for: it would only warn
    if training_args.torch_compile:
        # Compile one decoder layer and reuse it for all 32 (accelerate's regional compilation), for
        # packed batches whose length changes every step (dynamic shapes): ~1 min, not ~32 or one per step.
        # Defaults only: a value in the environment is the user's.
        os.environ.setdefault("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "true")
        os.environ.setdefault("ACCELERATE_DYNAMO_USE_DYNAMIC", "true")
