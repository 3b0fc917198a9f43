"""The one way a model is loaded here, for training, merging and evaluation alike."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from ..launch import fsdp_enabled


def this_process_device() -> str:
    """The GPU of this process (one per process under accelerate), or the CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    from accelerate import PartialState

    return f"cuda:{PartialState().local_process_index}"


def load_model(name_or_path: str, dtype: str | None = "auto", *, revision: str | None = None,
               device: str | None = None, quantization_config=None, attn_implementation: str | None = None):
    """A causal LM, its weights loaded straight onto `device` ("cuda:0", "cpu"; None leaves them on the CPU for
    the Trainer to place). dtype is transformers' own string ("bfloat16", "float32", "auto": as stored).

    A quantized model is placed at load time, so it goes to this process's GPU: device_map="auto" would
    spread one replica over all GPUs, which under DDP silently turns data parallelism into model
    parallelism (trl#921); under FSDP the shards are placed by FSDP itself."""
    if quantization_config is not None and device is None and torch.cuda.is_available() and not fsdp_enabled():
        device = this_process_device()
    return AutoModelForCausalLM.from_pretrained(
        name_or_path, revision=revision, dtype=dtype or "auto", attn_implementation=attn_implementation,
        quantization_config=quantization_config, device_map=device, trust_remote_code=False,
    )


def load_for_inference(name_or_path: str, dtype: str, device: str):
    """A model to generate with: in eval mode, its weights frozen. Frozen, the base and a tuned model merged from it
    (peft freezes what it loads into) decode with one compiled step: torch.compile's guards check each weight's
    requires_grad, and a mismatch compiles the step again (tests/test_generation.py)."""
    return load_model(name_or_path, dtype, device=device).eval().requires_grad_(False)


def set_generation_ids(model, tokenizer) -> None:
    """What a saved model needs to stop by itself and to batch-generate without being told."""
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
