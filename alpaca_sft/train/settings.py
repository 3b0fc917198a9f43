"""The project's own settings, parsed by TrlParser beside TRL's SFTConfig and ModelConfig; the checks
that refuse bad settings before any weights load; and what the pipeline sets on top of a recipe."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.trainer_utils import get_last_checkpoint

from ..data.records import LOCAL_SUFFIXES
from ..data.sources import dataset_problem, model_problem
from .run_record import holds_a_run


class SettingsError(ValueError):
    """A setting that cannot work; the message says what to change."""


@dataclass
class ScriptArguments:
    dataset_name: str = field(
        default="tatsu-lab/alpaca",
        metadata={"help": "Hub dataset id, or a local .json/.jsonl/.parquet/.csv with instruction/input/output."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on (Hub datasets)."})
    drop_invalid_rows: bool = field(
        default=False,
        metadata={"help": "Drop rows that cannot be trained on and count them, instead of failing on them."},
    )
    overlong_policy: str = field(
        default="drop",
        metadata={"help": "Examples longer than max_length: 'drop' (and count) or 'error'. Never cut."},
    )
    max_train_rows: int | None = field(default=None, metadata={"help": "Use only the first N rows (smoke runs)."})
    preview: int = field(
        default=0,
        metadata={"help": "Print N examples with the trained span marked, write preview.jsonl, load no model, exit."},
    )
    validation_size: float = field(
        default=0.0,
        metadata={"help": "Examples held out of training for validation: a fraction below 1 (0.01), or a count (200); "
                          "0 holds none out. Copies of a held-out example are held out with it."},
    )
    validation_seed: int = field(default=42, metadata={"help": "Seed of the choice of held-out examples."})
    validation_file: str | None = field(
        default=None, metadata={"help": "A separate .json/.jsonl/.parquet/.csv to validate on, instead of a held-out part."}
    )
    samples_at_end: int = field(
        default=0,
        metadata={"help": "After training, greedy answers to this many validation prompts: did each stop by EOS, "
                          "after how many tokens (printed and in run_summary.json); 0 = off."},
    )
    sample_max_new_tokens: int = field(default=128, metadata={"help": "Longest answer samples_at_end generates."})
    fused_lora: bool = field(
        default=True,
        metadata={"help": "LoRA's scale and add folded into its GEMMs (same math as PEFT's forward, fewer passes); "
                          "false runs PEFT's own forward."},
    )
    fp8_base: bool = field(
        default=False,
        metadata={"help": "The frozen base's adapted linear layers in FP8 (e4m3, per-channel scales; Hopper GPUs or newer): "
                          "1.26x the bf16 recipe's tokens/s on an H100, same memory; LoRA, norms, embeddings, LM head stay bf16."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow training into an output_dir that already holds another run."}
    )


def parse_settings(argv: list[str] | None = None):
    """(ScriptArguments, SFTConfig, ModelConfig) from --config YAML and the command line, which
    overrides it; an unknown key or flag, or a value of the wrong type, is a SettingsError."""
    from trl import ModelConfig, SFTConfig, TrlParser

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))

    def refuse(message: str):  # argparse's own errors would print the usage of some 200 settings first
        raise SettingsError(f"{message} (train_sft.py --help lists every setting)")

    parser.error = refuse
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as err:
        raise SettingsError(str(err)) from None


def resume_target(training_args) -> str | None:
    """The checkpoint to resume from: resume_from_checkpoint is a path, or "true" for the newest
    checkpoint-* in output_dir (the command line hands the flag over as a string)."""
    resume = training_args.resume_from_checkpoint
    if resume in (None, False) or str(resume).lower() == "false":
        return None
    if resume is True or str(resume).lower() == "true":
        folder = Path(training_args.output_dir)
        latest = get_last_checkpoint(str(folder)) if folder.is_dir() else None
        if latest is None:
            raise SettingsError(f"resume_from_checkpoint: no checkpoint-* in {folder} to resume from")
        return latest
    if not Path(resume).is_dir():
        raise SettingsError(f"resume_from_checkpoint={resume}: no such checkpoint folder")
    return str(resume)


def fp8_gemm_problem(use_cpu: bool = False) -> str | None:
    """Why this machine cannot run FP8 GEMMs with row-wise scales at speed, or None: they need Hopper's
    (or a newer GPU's) FP8 tensor cores; elsewhere torch has no such kernel or emulates it."""
    if use_cpu or not torch.cuda.is_available():
        return "this machine has no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (9, 0):
        return f"this GPU ({torch.cuda.get_device_name()}) has compute capability {major}.{minor}"
    return None


def check_settings(script_args: ScriptArguments, training_args, model_args) -> None:
    """Every setting that can be checked without weights, at once: one SettingsError listing each
    problem and its fix. Changes nothing."""
    from accelerate import PartialState

    problems = []

    def check(bad: bool, message: str) -> None:
        if bad:
            problems.append(message)

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    check(world_size > PartialState().num_processes,
          f"{world_size} processes were launched but not joined into one group, so each would train alone; "
          "on a machine without a GPU add --use_cpu true")
    try:
        resume = resume_target(training_args)
    except SettingsError as err:
        problems.append(str(err))
        resume = None

    if not model_args.model_name_or_path:
        problems.append("model_name_or_path is not set: give a Hub id or a local model folder")
    else:
        check(bool(problem := model_problem(model_args.model_name_or_path, model_args.model_revision)), f"model: {problem}")
    source = Path(script_args.dataset_name)
    check(source.suffix in LOCAL_SUFFIXES and not source.is_file(), f"dataset_name={script_args.dataset_name}: no such file")
    if source.suffix not in LOCAL_SUFFIXES:
        check(bool(problem := dataset_problem(script_args.dataset_name)), f"dataset: {problem}")

    size, validation_file = script_args.validation_size, script_args.validation_file
    validation = bool(size or validation_file)
    check(size < 0 or (size >= 1 and size != int(size)),
          f"validation_size={size:g}: give a fraction below 1 (0.01) or a whole number of examples (200)")
    check(bool(size) and bool(validation_file), "validation_size and validation_file are both set: pick one")
    if validation_file:
        path = Path(validation_file)
        check(path.suffix not in LOCAL_SUFFIXES or not path.is_file(),
              f"validation_file={validation_file}: no such .json/.jsonl/.parquet/.csv file")
    check(training_args.eval_strategy != "no" and not validation,
          f"eval_strategy={training_args.eval_strategy.value}: there is no validation data; "
          "set validation_size (a held-out part) or validation_file, or eval_strategy: 'no'")
    check(script_args.samples_at_end < 0, f"samples_at_end={script_args.samples_at_end}: must be >= 0")
    check(script_args.samples_at_end > 0 and not validation,
          "samples_at_end answers validation prompts: set validation_size or validation_file, or samples_at_end: 0")
    check(training_args.max_length is not None and training_args.max_length <= 0,
          f"max_length={training_args.max_length}: must be a positive number of tokens")
    check(script_args.overlong_policy not in ("drop", "error"), f"overlong_policy={script_args.overlong_policy!r}: use 'drop' or 'error'")
    check(script_args.preview < 0, f"preview={script_args.preview}: must be >= 0")
    check(training_args.max_steps <= 0 and training_args.num_train_epochs <= 0,
          f"num_train_epochs={training_args.num_train_epochs} and no max_steps: nothing would be trained; "
          "set num_train_epochs > 0 or max_steps > 0")
    check(training_args.learning_rate <= 0, f"learning_rate={training_args.learning_rate}: must be > 0")
    check(training_args.per_device_train_batch_size <= 0,
          f"per_device_train_batch_size={training_args.per_device_train_batch_size}: must be >= 1")
    check(training_args.gradient_accumulation_steps <= 0,
          f"gradient_accumulation_steps={training_args.gradient_accumulation_steps}: must be >= 1")

    check(model_args.use_peft and model_args.lora_r <= 0, f"lora_r={model_args.lora_r}: the LoRA rank must be > 0")
    check(model_args.use_peft and model_args.lora_alpha <= 0, f"lora_alpha={model_args.lora_alpha}: must be > 0")
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    check(model_args.load_in_4bit and model_args.load_in_8bit, "load_in_4bit and load_in_8bit are both set: pick one")
    check(quantized and not importlib.util.find_spec("bitsandbytes"), "load_in_4bit/load_in_8bit need bitsandbytes: pip install bitsandbytes")
    check(quantized and not model_args.use_peft, "a quantized base can only be trained through adapters: set use_peft: true")
    check(model_args.load_in_4bit and not torch.cuda.is_available() and not training_args.use_cpu,
          "load_in_4bit without a CUDA GPU: bitsandbytes runs NF4 on the CPU ~100x slower; "
          "set use_cpu: true if that is really what you want")
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if script_args.fp8_base:
        check(not model_args.use_peft, "fp8_base puts the frozen base in FP8 under LoRA: set use_peft: true")
        check(quantized, "fp8_base and load_in_4bit/load_in_8bit are two precisions for the same base: pick one")
        check(model_args.dtype != "bfloat16", f"fp8_base: set dtype: bfloat16 (not {model_args.dtype}); "
                                              "the FP8 GEMMs write bf16")
        check(fsdp, "fp8_base runs on one GPU or under DDP (accelerate_configs/multi_gpu.yaml), not FSDP")
        check(training_args.torch_compile, "fp8_base compiles its own quantization kernels: set torch_compile: false")
        check(bool(problem := fp8_gemm_problem(training_args.use_cpu)),
              f"fp8_base needs FP8 tensor cores (Hopper: H100, H200, or newer) and {problem}: "
              "train a bf16 base (recipes/mistral-7b-lora.yaml) or a 4-bit one (recipes/mistral-7b-qlora.yaml)")
    check(fsdp and model_args.load_in_4bit and model_args.bnb_4bit_quant_storage not in ("bfloat16", "float16", "float32"),
          "FSDP with a 4-bit base: FSDP shards only floating-point tensors, so store the 4-bit weights in one: "
          "add --bnb_4bit_quant_storage bfloat16")
    trackers = set(training_args.report_to or [])
    check("tensorboard" in trackers and not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")),
          "report_to tensorboard needs tensorboard: pip install -e \".[track]\" (or pip install tensorboard)")
    check("wandb" in trackers and not importlib.util.find_spec("wandb"), "report_to wandb needs wandb: pip install wandb")
    check(training_args.use_liger_kernel and not importlib.util.find_spec("liger_kernel"),
          "use_liger_kernel needs liger-kernel: pip install liger-kernel (or set it false)")

    output_dir = Path(training_args.output_dir)
    check(output_dir.exists() and not output_dir.is_dir(), f"output_dir={output_dir} is a file; give a folder")
    check(holds_a_run(output_dir) and not (script_args.overwrite_output_dir or resume or script_args.preview),
          f"output_dir={output_dir} already holds a run: pass --resume_from_checkpoint true to continue it, "
          "--overwrite_output_dir true to replace it, or another --output_dir")
    if problems:
        raise SettingsError("bad settings:\n" + "\n".join(f"  - {p}" for p in problems))


def apply_pipeline_settings(training_args) -> None:
    """What this pipeline sets on top of any recipe, once the settings are checked."""
    training_args.resume_from_checkpoint = resume_target(training_args)
    if training_args.hub_token:  # kept out of every saved config and log; huggingface_hub reads HF_TOKEN
        os.environ["HF_TOKEN"], training_args.hub_token = training_args.hub_token, None
    training_args.logging_nan_inf_filter = False  # a NaN loss must show, not be averaged away
    # The Trainer's own token counter is what a checkpoint keeps: the run's record spans a resume.
    if training_args.include_num_input_tokens_seen in ("no", False):
        training_args.include_num_input_tokens_seen = True  # all tokens: packed rows are padding-free
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # nothing to pin for: it would only warn
    if training_args.torch_compile:
        # Compile one decoder layer and reuse it for all 32 (accelerate's regional compilation), for
        # packed batches whose length changes every step (dynamic shapes): ~1 min, not ~32 or one per step.
        os.environ.setdefault("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "true")
        os.environ.setdefault("ACCELERATE_DYNAMO_USE_DYNAMIC", "true")
