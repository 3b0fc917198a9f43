"""Pairing a base model with what was trained on it, and merging a LoRA/QLoRA adapter into it.

An adapter is always merged into a full-precision (bf16/fp16/fp32) load of the base, never into
4-bit weights: merging into NF4 would re-quantize the sum and lose what was learned (peft#2321).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size")


class PairError(ValueError):
    """The base and the tuned model do not belong together, or one of them is missing."""


@dataclass
class Tuned:
    path: Path
    is_adapter: bool
    trained_in_4bit: bool
    recorded_base: str | None


def _config(name_or_path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except Exception as err:  # missing folder, no config.json, Hub unreachable
        raise PairError(f"cannot read the model config of {name_or_path!r}: {err}") from err


def inspect_pair(base: str, tuned: str | Path) -> Tuned:
    """Checks, from configs and tensor shapes alone, that `tuned` (an adapter folder or a merged
    model folder) was made from `base`. Nothing large is loaded."""
    tuned = Path(tuned)
    if not tuned.is_dir():
        raise PairError(f"--tuned {tuned}: no such folder (give an adapter folder from train_sft.py or a merged model)")
    base_config = _config(base)
    if (tuned / "adapter_config.json").is_file():
        adapter = json.loads((tuned / "adapter_config.json").read_text())
        recorded = adapter.get("base_model_name_or_path")
        if recorded and recorded != base and Path(recorded).is_dir():
            _same_shape(_config(recorded), base_config, f"the adapter's base {recorded}", base)
        _adapter_fits(tuned, base_config, base)
        run_config = tuned / "train_config.yaml"
        in_4bit = bool(run_config.is_file() and (yaml.safe_load(run_config.read_text()) or {}).get("load_in_4bit"))
        return Tuned(tuned, True, in_4bit, recorded)
    if (tuned / "config.json").is_file():
        _same_shape(_config(str(tuned)), base_config, str(tuned), base)
        return Tuned(tuned, False, False, None)
    raise PairError(f"--tuned {tuned} holds neither adapter_config.json nor config.json")


def _same_shape(a, b, a_name: str, b_name: str) -> None:
    differ = [f"{k}: {getattr(a, k, None)} vs {getattr(b, k, None)}" for k in SHAPE_KEYS
              if getattr(a, k, None) != getattr(b, k, None)]
    if differ:
        raise PairError(f"{a_name} is not the same model as --base {b_name} ({'; '.join(differ)})")


def _adapter_fits(adapter_dir: Path, base_config, base: str) -> None:
    """Every LoRA matrix must match the shape of the base layer it adapts: built on the meta
    device, the base model costs no memory."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise PairError(f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors")
    with torch.device("meta"):
        modules = dict(AutoModelForCausalLM.from_config(base_config).named_modules())
    with safe_open(str(weights), framework="pt") as tensors:
        for key in tensors.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module_name = key.split(".lora_")[0].removeprefix("base_model.model.")
            layer = modules.get(module_name)
            shape = tensors.get_slice(key).get_shape()
            expected = getattr(layer, "in_features", None) if ".lora_A." in key else getattr(layer, "out_features", None)
            fits = layer is not None and (shape[1] if ".lora_A." in key else shape[0]) == expected
            if not fits:
                raise PairError(
                    f"the adapter in {adapter_dir} was not trained on --base {base}: {key} has shape {list(shape)}, "
                    f"which does not fit {module_name} of the base ({layer})"
                )


def logits_on(model, tokenizer, texts: list[str]) -> torch.Tensor:
    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
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


def quantized_gap(base: str, adapter_dir: Path, tokenizer, probe_texts: list[str], merged_logits: torch.Tensor) -> dict:
    """For a QLoRA adapter: how far the merged full-precision model is from what was trained
    (the 4-bit base plus the adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    device_map = {"": 0} if torch.cuda.is_available() else None
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quantization, device_map=device_map)
    trained = logits_on(PeftModel.from_pretrained(model, str(adapter_dir)), tokenizer, probe_texts)
    gap = (trained - merged_logits.to(trained.device)).abs()
    agree = (trained.argmax(-1) == merged_logits.to(trained.device).argmax(-1)).float().mean().item()
    return {"max_abs_logit_diff": gap.max().item(), "mean_abs_logit_diff": gap.mean().item(), "top1_agreement": agree}


def save_merged(model, tokenizer, folder: Path) -> Path:
    """safetensors shards (5 GB each: 3 for a bf16 7B), tokenizer, generation config with EOS:
    reloads with AutoModelForCausalLM.from_pretrained(folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, max_shard_size="5GB")
    tokenizer.save_pretrained(folder)
    return folder
