"""Is the tuned folder made from --base? Answered from configs, tensor shapes and a fingerprint of
the base's stored weights, before anything large loads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.sources import model_fingerprint, model_problem
from ..train.checkpoints import CHECKPOINT, is_sealed, newest_sealed
from ..train.run_record import RunRecord

SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size")


class PairError(ValueError):
    """The base and the tuned model do not belong together, or one of them is missing."""


@dataclass
class Tuned:
    path: Path
    is_adapter: bool
    record: RunRecord  # the run's train_config.yaml and run_summary.json, when train_sft.py made it

    @property
    def trained_in_4bit(self) -> bool:
        return bool(self.record.config.get("load_in_4bit"))

    @property
    def trained_in_fp8(self) -> bool:
        return bool(self.record.config.get("fp8_base"))


def _config(name_or_path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    except Exception as err:  # no config.json, or a cache without it
        raise PairError(f"cannot read the model config of {name_or_path!r}: {err}") from err


def inspect_pair(base: str, tuned: str | Path, allow_other_base: bool = False) -> Tuned:
    """Checks that `tuned` (an adapter folder from train_sft.py, or a merged model folder) was made
    from `base`: the adapter's tensors fit the base's layers, and the base it was trained on is this
    one (same stored weights), unless allow_other_base."""
    tuned = Path(tuned)
    if not tuned.is_dir():
        raise PairError(f"--tuned {tuned}: no such folder (give an adapter folder from train_sft.py or a merged model)")
    if problem := model_problem(base):
        raise PairError(f"--base: {problem}")
    if Path(base).expanduser().resolve() == tuned.resolve():
        raise PairError(f"--tuned {tuned} is --base itself: give the folder train_sft.py wrote (its output_dir)")
    if CHECKPOINT.match(tuned.name) and not is_sealed(tuned):
        newest, _ = newest_sealed(tuned.parent)
        raise PairError(f"--tuned {tuned} was not completely written (the run died while saving it)"
                        + (f"; the newest complete checkpoint is --tuned {newest}" if newest else ""))
    base_config = _config(base)
    if (tuned / "adapter_config.json").is_file():
        record = RunRecord.read(tuned)
        _adapter_fits(tuned, base_config, base)
        recorded = json.loads((tuned / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not allow_other_base:
            _same_base(base, recorded, record.summary.get("base_fingerprint"), tuned)
        return Tuned(tuned, True, record)
    if (tuned / "config.json").is_file():
        if problem := model_problem(str(tuned)):
            raise PairError(f"--tuned: {problem}")
        _same_shape(_config(str(tuned)), base_config, str(tuned), base)
        return Tuned(tuned, False, RunRecord.read(tuned))
    latest, unsealed = newest_sealed(tuned)
    if latest or unsealed:
        skipped = f" ({', '.join(p.name for p in unsealed)} not completely written)" if unsealed else ""
        raise PairError(f"--tuned {tuned} holds no finished adapter (the run stopped early); "
                        + (f"its newest complete checkpoint is --tuned {latest}{skipped}, or resume the run with "
                           "--resume_from_checkpoint true" if latest else f"it holds no complete checkpoint{skipped}"))
    raise PairError(f"--tuned {tuned} holds neither adapter_config.json nor config.json")


def _same_base(base: str, recorded: str | None, recorded_fingerprint: str | None, tuned: Path) -> None:
    fingerprint = model_fingerprint(base)
    if recorded_fingerprint and fingerprint:
        same = fingerprint == recorded_fingerprint
    else:  # an adapter from elsewhere, or a Hub base not downloaded yet: the names must agree
        def canonical(name):
            return str(Path(name).resolve()) if name and Path(name).exists() else name

        same = recorded is None or canonical(recorded) == canonical(base)
    if not same:
        raise PairError(
            f"the adapter in {tuned} was trained on {recorded}"
            + (f" (weights {recorded_fingerprint})" if recorded_fingerprint else "")
            + f", not on --base {base}" + (f" (weights {fingerprint})" if fingerprint else "")
            + ": merged into another base it makes a model nobody trained. "
            "Give the base it was trained on, or pass --allow_other_base to merge anyway"
        )


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
        modules = dict(AutoModelForCausalLM.from_config(base_config, trust_remote_code=False).named_modules())
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
