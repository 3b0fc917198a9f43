"""The project's own settings, parsed by TrlParser beside TRL's SFTConfig and ModelConfig, and the
checks that reject bad settings before any weights load."""

from __future__ import annotations

import importlib.util
import os

import torch
from dataclasses import dataclass, field
from pathlib import Path

from .attention import resolve_attention
from .data import LOCAL_SUFFIXES
from .outputs import holds_a_run


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
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow training into an output_dir that already holds another run."}
    )


def check_settings(script_args: ScriptArguments, training_args, model_args) -> None:
    """Fail fast, before any download or weight load, on settings that cannot work."""
    problems = []
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        # The field is a path; "true" means the newest checkpoint-* in output_dir.
        training_args.resume_from_checkpoint = resume = True if resume.lower() == "true" else None
    if resume is True and not any(Path(training_args.output_dir).glob("checkpoint-*")):
        problems.append(f"resume_from_checkpoint: no checkpoint-* in {training_args.output_dir} to resume from")
    elif isinstance(resume, str) and not Path(resume).is_dir():
        problems.append(f"resume_from_checkpoint={resume}: no such checkpoint folder")
    if not model_args.model_name_or_path:
        problems.append("model_name_or_path is not set: give a Hub id or a local model folder")
    if training_args.max_length is not None and training_args.max_length <= 0:
        problems.append(f"max_length={training_args.max_length}: must be a positive number of tokens")
    if script_args.overlong_policy not in ("drop", "error"):
        problems.append(f"overlong_policy={script_args.overlong_policy!r}: use 'drop' or 'error'")
    if script_args.preview < 0:
        problems.append(f"preview={script_args.preview}: must be >= 0")
    if model_args.use_peft and model_args.lora_r <= 0:
        problems.append(f"lora_r={model_args.lora_r}: the LoRA rank must be > 0")
    if model_args.use_peft and model_args.lora_alpha <= 0:
        problems.append(f"lora_alpha={model_args.lora_alpha}: must be > 0")
    if model_args.load_in_4bit and model_args.load_in_8bit:
        problems.append("load_in_4bit and load_in_8bit are both set: pick one")
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not importlib.util.find_spec("bitsandbytes"):
        problems.append("load_in_4bit/load_in_8bit need bitsandbytes: pip install bitsandbytes")
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not model_args.use_peft:
        problems.append("a quantized base can only be trained through adapters: set use_peft: true")
    if model_args.load_in_4bit and not torch.cuda.is_available() and not training_args.use_cpu:
        problems.append(
            "load_in_4bit without a CUDA GPU: bitsandbytes runs NF4 on the CPU ~100x slower; "
            "set use_cpu: true if that is really what you want"
        )
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and model_args.load_in_4bit and model_args.bnb_4bit_quant_storage not in ("bfloat16", "float16", "float32"):
        problems.append(
            "FSDP with a 4-bit base: FSDP shards only floating-point tensors, so store the 4-bit weights in one: "
            "add --bnb_4bit_quant_storage bfloat16"
        )
    if training_args.use_liger_kernel and not importlib.util.find_spec("liger_kernel"):
        problems.append("use_liger_kernel needs liger-kernel: pip install liger-kernel (or set it false)")
    try:
        resolve_attention(model_args.attn_implementation, training_args.packing)
    except ValueError as err:
        problems.append(str(err))
    if holds_a_run(training_args.output_dir) and not (
        script_args.overwrite_output_dir or training_args.resume_from_checkpoint or script_args.preview
    ):
        problems.append(
            f"output_dir={training_args.output_dir} already holds a run: pass --resume_from_checkpoint true to "
            "continue it, --overwrite_output_dir true to replace it, or another --output_dir"
        )
    source = Path(script_args.dataset_name)
    if source.suffix in LOCAL_SUFFIXES and not source.is_file():
        problems.append(f"dataset_name={script_args.dataset_name}: no such file")
    if problems:
        raise SettingsError("bad settings:\n" + "\n".join(f"  - {p}" for p in problems))
