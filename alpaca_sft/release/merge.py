"""Merging a LoRA/QLoRA adapter into its base, and measuring that the merge is what was trained.

An adapter is always merged into a full-precision (bf16/fp16/fp32) load of the base, never into
4-bit or FP8 weights: merging into NF4 would re-quantize the sum and lose what was learned (peft#2321).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..kernels.fp8_base import fp8_gemm_problem, quantize_frozen_base
from ..kernels.fused_lora import fuse_lora
from ..models.loading import load_model, set_generation_ids, this_process_device
from ..run_folder.record import BasePrecision


def logits_on(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """The logits at every real (unpadded) position of `texts`, batched."""
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left").to(next(model.parameters()).device)
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    return logits[inputs["attention_mask"].bool()]


def merge(base_model, adapter_dir: Path, tokenizer, probe_texts: list[str]):
    """The merged model and the largest logit difference between base+adapter and merged on the
    probe texts (the merge-equivalence check, on every run)."""
    from peft import PeftModel

    with_adapter = PeftModel.from_pretrained(base_model, str(adapter_dir))
    before = logits_on(with_adapter, tokenizer, probe_texts)
    merged = with_adapter.merge_and_unload()
    after = logits_on(merged, tokenizer, probe_texts)
    return merged, (before - after).abs().max().item()


def quantized_gap(base: str, adapter_dir: Path, precision: BasePrecision, tokenizer, probe_texts: list[str],
                  merged_logits: torch.Tensor) -> dict:
    """For an adapter trained on a quantized base (QLoRA's 4-bit, or FP8): how far the merged
    full-precision model is from what was trained, the base quantized as the run recorded it
    (through TRL's own get_quantization_config, or fp8_base's layers and input gradients, as training did)
    plus the adapter."""
    from peft import PeftModel
    from trl import ModelConfig, get_quantization_config

    fp8 = precision.kind == "FP8"
    if fp8 and torch.cuda.is_available() and (problem := fp8_gemm_problem()):
        return {"not_measured": f"the FP8 base needs a Hopper GPU or newer, and {problem}"}
    model_args = ModelConfig(**precision.quantization_settings())
    dtype = "bfloat16" if fp8 else model_args.dtype  # an FP8 base is quantized from bf16 weights, as training requires
    model = load_model(base, dtype, device=this_process_device(),
                       quantization_config=get_quantization_config(model_args))
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    measured = {}
    if fp8:  # as training ran it, its layers chosen as recorded (the CPU emulates FP8's GEMMs: same numbers, slowly)
        measured["layers_in_fp8"] = quantize_frozen_base(model, precision.fp8_layers, precision.fp8_input_grad)
        fuse_lora(model)
    trained = logits_on(model, tokenizer, probe_texts)
    gap = (trained - merged_logits.to(trained.device)).abs()
    agree = (trained.argmax(-1) == merged_logits.to(trained.device).argmax(-1)).float().mean().item()
    return {**measured, "max_abs_logit_diff": gap.max().item(), "mean_abs_logit_diff": gap.mean().item(),
            "top1_agreement": agree}


def save_merged(model, tokenizer, folder: Path) -> Path:
    """safetensors shards (5 GB each: 3 for a bf16 7B), tokenizer, generation config with EOS:
    reloads with AutoModelForCausalLM.from_pretrained(folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    set_generation_ids(model, tokenizer)
    model.save_pretrained(folder, max_shard_size="5GB")
    tokenizer.save_pretrained(folder)
    return folder
