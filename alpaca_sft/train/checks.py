"""Every setting that can be checked without weights, at once, before any weights load: one SettingsError
listing each problem and its fix. Each check below returns the problems of one concern; none changes
anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..data.records import LOCAL_SUFFIXES, dataset_problem
from ..kernels.fp8_base import fp8_gemm_problem
from ..launch import fsdp_enabled, launched_processes
from ..models.sources import model_problem
from .checkpoints import resume_target
from .run_record import holds_a_run
from .settings import SettingsError, settings_error


def check_settings(script_args, training_args, model_args) -> None:
    problems = []
    try:
        resume = resume_target(training_args)
    except SettingsError as err:
        problems.append(str(err))
        resume = None
    for check in (_launch_problems(training_args), _source_problems(script_args, model_args),
                  _validation_problems(script_args), _training_problems(training_args),
                  _adapter_problems(script_args, training_args, model_args), _tracker_problems(training_args),
                  _output_problems(script_args, training_args, resume)):
        problems += check
    if problems:
        raise settings_error(problems)


def _missing(package: str) -> bool:
    return importlib.util.find_spec(package) is None


def _launch_problems(training_args) -> list[str]:
    from accelerate import PartialState

    if launched_processes() > PartialState().num_processes:
        return [f"{launched_processes()} processes were launched but not joined into one group, so each would train "
                "alone; on a machine without a GPU add --use_cpu true"]
    return []


def _source_problems(script_args, model_args) -> list[str]:
    problems = []
    if not model_args.model_name_or_path:
        problems.append("model_name_or_path is not set: give a Hub id or a local model folder")
    elif problem := model_problem(model_args.model_name_or_path, model_args.model_revision):
        problems.append(f"model: {problem}")
    for setting in ("dataset_name", "mix_dataset_name"):
        name = getattr(script_args, setting)
        if name is None:
            continue
        source = Path(name)
        if source.suffix in LOCAL_SUFFIXES and not source.is_file():
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
    if training_args.use_liger_kernel and _missing("liger_kernel"):
        problems.append("use_liger_kernel needs liger-kernel: pip install liger-kernel (or set it false)")
    return problems


def _adapter_problems(script_args, training_args, model_args) -> list[str]:
    """LoRA, the base's precision (bf16, 4-bit, 8-bit, FP8) and what each needs of the machine."""
    problems = []
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


def _tracker_problems(training_args) -> list[str]:
    trackers, problems = set(training_args.report_to or []), []
    if "tensorboard" in trackers and _missing("tensorboard") and _missing("tensorboardX"):
        problems.append("report_to tensorboard needs tensorboard: pip install -e \".[track]\" (or pip install tensorboard)")
    if "wandb" in trackers and _missing("wandb"):
        problems.append("report_to wandb needs wandb: pip install wandb")
    return problems


def _output_problems(script_args, training_args, resume) -> list[str]:
    output_dir = Path(training_args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        return [f"output_dir={output_dir} is a file; give a folder"]
    if holds_a_run(output_dir) and not (script_args.overwrite_output_dir or resume or script_args.preview):
        return [f"output_dir={output_dir} already holds a run: pass --resume_from_checkpoint true to continue it, "
                "--overwrite_output_dir true to replace it, or another --output_dir"]
    return []
