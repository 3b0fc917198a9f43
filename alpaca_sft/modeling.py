"""Loading the tokenizer and the base model the way this recipe needs them."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from accelerate import PartialState
from trl import get_quantization_config


def load_tokenizer(name_or_path: str, revision: str | None = None):
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    # Mistral ships no pad token. Padding with EOS is the classic bug: masked pads then mask the
    # one EOS that should be learned, and the model never stops (trl#1623). <unk> is never
    # produced by the byte-fallback tokenizer, so it is a safe pad.
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an <unk> to pad with; set pad_token")
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def _one_replica_per_process() -> dict | None:
    # A quantized model is placed at load time. device_map="auto" would spread one replica over all
    # GPUs, which under DDP silently turns data parallelism into model parallelism (trl#921).
    # Under FSDP the shards are placed by FSDP itself.
    if not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return None
    return {"": PartialState().local_process_index}


def load_model(model_args, tokenizer, attn_implementation: str | None = None):
    quantization_config = get_quantization_config(model_args)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=dtype,
        attn_implementation=attn_implementation or model_args.attn_implementation,
        quantization_config=quantization_config,
        device_map=_one_replica_per_process() if quantization_config is not None else None,
    )
    model.config.use_cache = False  # training: the KV cache is dead weight and breaks packed masks
    # What a reloaded model needs to stop by itself and to batch-generate.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    return model
