"""Loading the base model the way this recipe trains it."""

from __future__ import annotations

import os

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM
from trl import get_quantization_config


def set_generation_ids(model, tokenizer) -> None:
    """What a saved model needs to stop by itself and to batch-generate without being told."""
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id


def _one_replica_per_process() -> dict | None:
    # A quantized model is placed at load time. device_map="auto" would spread one replica over all
    # GPUs, which under DDP silently turns data parallelism into model parallelism (trl#921).
    # Under FSDP the shards are placed by FSDP itself.
    if not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return None
    return {"": PartialState().local_process_index}


def pin_liger_rope_to_triton() -> None:
    """Keep Liger's Triton RoPE, the kernel this recipe was measured with.

    Liger 0.8.5 picks its CuTe DSL RoPE instead on Hopper whenever nvidia-cutlass-dsl is importable,
    which flash-attn-4 installs. On an H100 that made the recipe's micro-batch take 1,166 ms for the
    same 740 ms of GPU work (745 ms with the Triton RoPE): the whole step waited on the host
    (bench/RESULTS.md). Liger's own per-op setting pins it; a LIGER_KERNEL_IMPL_ROPE the user set wins."""
    try:
        from liger_kernel.backends import all_impls
    except ImportError:  # a Liger without per-op dispatch has only its Triton kernels
        return
    if "nvidia-triton" in all_impls("rope"):
        os.environ.setdefault("LIGER_KERNEL_IMPL_ROPE", "nvidia-triton")


def load_model(model_args, tokenizer, attn_implementation: str):
    quantization_config = get_quantization_config(model_args)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=dtype,
        attn_implementation=attn_implementation,
        quantization_config=quantization_config,
        device_map=_one_replica_per_process() if quantization_config is not None else None,
    )
    model.config.use_cache = False  # training: the KV cache is dead weight, and packed rows need none
    set_generation_ids(model, tokenizer)
    return model
