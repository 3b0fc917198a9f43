"""Is the tuned folder made from --base? Answered from configs, tensor shapes and a fingerprint of
the base's stored weights, before anything large loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.sources import model_fingerprint, model_problem
from ..run_folder.layout import CHECKPOINT, is_sealed, newest_sealed
from ..run_folder.record import LoraSettings, RunRecord

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
        return self.record.precision is not None and self.record.precision.kind == "4-bit"

    @property
    def trained_in_fp8(self) -> bool:
        return self.record.precision is not None and self.record.precision.kind == "FP8"


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
        adapter = _adapter_config(tuned)
        _adapter_as_made(tuned, adapter, record)
        recorded = adapter.base_model_name_or_path
        if not allow_other_base:
            _same_base(base, recorded, record.base_fingerprint, tuned)
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


def _adapter_config(tuned: Path):
    """adapter_config.json as PEFT reads it (a LoraConfig for the adapters train_sft.py makes)."""
    from peft import PeftConfig

    try:
        return PeftConfig.from_pretrained(str(tuned))
    except Exception as err:  # not JSON, or fields PEFT refuses
        raise PairError(f"{tuned / 'adapter_config.json'} cannot be read by PEFT ({err}): restore the one saved with "
                        "the adapter") from None


def _adapter_as_made(tuned: Path, adapter, record: RunRecord) -> None:
    """PEFT merges an adapter as its adapter_config.json says, whatever it was trained as: an edited config (a
    scale of 320 for 32, a rank or target list cut) is merged as edited, or fails inside PEFT after the base
    has generated. So the config must agree with the run that made it (train_config.yaml, where there is one)
    and with the adapter's own tensors."""
    differ = _unlike_record(adapter, record.lora) + _unlike_tensors(adapter, tuned / "adapter_model.safetensors")
    if differ:
        raise PairError(f"{tuned / 'adapter_config.json'} does not describe the adapter it is saved with: "
                        f"{'; '.join(differ)}. PEFT would merge the adapter as that file says, not as it was trained: "
                        "restore the adapter_config.json saved with it"
                        + (" (the run's settings are in train_config.yaml beside it)" if record.settings else ""))


def _as_set(value):
    return {value} if isinstance(value, str) else set(value) if value is not None else None


def _unlike_record(adapter, trained: LoraSettings | None) -> list[str]:
    if trained is None:  # no train_config.yaml: an adapter made elsewhere stands on its own config
        return []
    differ = []
    for key, setting in LoraSettings.SETTINGS.items():
        recorded, saved = getattr(trained, key), getattr(adapter, key, None)
        if key == "target_modules" and _as_set(recorded) in (None, {"all-linear"}):
            continue  # PEFT chose the names and saved them: the tensors check them
        if key in ("target_modules", "modules_to_save", "target_parameters"):
            same = _as_set(recorded) == _as_set(saved)
        else:
            same = recorded == saved
        if not same:
            differ.append(f"{key} is {_shown(saved)} but the run trained with {setting} {_shown(recorded)}")
    return differ


def _unlike_tensors(adapter, weights: Path) -> list[str]:
    """What the stored tensors contradict: each module's rank (lora_A's rows), the modules adapted, DoRA's
    magnitude vectors; judged by PEFT's own target matching and rank patterns."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key
    from safetensors import safe_open

    if getattr(adapter, "r", None) is None:
        return []  # not LoRA: nothing here trains or checks it
    with safe_open(str(weights), framework="pt") as tensors:
        keys = list(tensors.keys())
        ranks = {key.split(".lora_A.")[0].removeprefix("base_model.model."): tensors.get_slice(key).get_shape()[0]
                 for key in keys if ".lora_A." in key}
    differ = []
    wrong_rank = {module: rank for module, rank in ranks.items()
                  if rank != adapter.rank_pattern.get(get_pattern_key(adapter.rank_pattern.keys(), module), adapter.r)}
    if wrong_rank:
        differ.append(f"r is {adapter.r} but its tensors have rank {', '.join(map(str, sorted(set(wrong_rank.values()))))}")
    untargeted = {module.rsplit(".", 1)[-1] for module in ranks if not check_target_module_exists(adapter, module)}
    if untargeted:
        differ.append(f"target_modules is {_shown(adapter.target_modules)} but its tensors also adapt "
                      f"{', '.join(sorted(untargeted))}")
    if bool(adapter.use_dora) != any("lora_magnitude_vector" in key for key in keys):
        differ.append(f"use_dora is {adapter.use_dora} but its tensors {'lack' if adapter.use_dora else 'hold'} DoRA's "
                      "magnitude vectors")
    return differ


def _shown(value) -> str:
    """A setting as a message shows it: a set of module names sorted, and shortened past a few."""
    if isinstance(value, (set, list, tuple)):
        names = sorted(value)
        return "[" + ", ".join(names[:6]) + (f", ... {len(names) - 6} more" if len(names) > 6 else "") + "]"
    return repr(value)
