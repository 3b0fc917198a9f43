"""Checkpoints a run can trust: sealed once every file of one is on disk, never chosen half-written, and a
resume that continues the same run.

transformers writes checkpoint-N file by file (adapter, optimizer, scheduler, RNG state, trainer state) and
rotates old ones out; a kill -9, a full disk or a second Ctrl-C in the middle leaves a folder that looks like
a checkpoint and is not one. After the Trainer's save returns (on_save, every process past it), the main
process writes the seal, `checkpoint.json`, atomically: the settings that shape the result, a fingerprint of
the training data and the number of processes. Resuming takes the newest sealed checkpoint, names any newer
one it skips (and sets it aside as checkpoint-N.incomplete), and compares the seal with the new run's
settings: a change that would make it another run is refused, naming it, unless allow_changed_settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback

from ..run_folder.layout import (TRAINER_STATE, checkpoint_name, checkpoint_step, checkpoints, is_sealed, newest_sealed,
                                 read_seal, write_seal)
from .settings import ScriptArguments, SettingsError

# What a checkpoint needs to continue the run it came from, beside the adapter (transformers' file names).
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", TRAINER_STATE)
# Settings that shape the trained adapter: a resume that changes one of them trains another run than the one
# checkpointed. Logging, evaluation, saving and output settings may change.
RESULT_SHAPING = (
    "model_name_or_path", "model_revision", "dtype", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
    "use_bnb_nested_quant", "fp8_base", "fp8_layers", "fp8_input_grad", "use_peft", "lora_r", "lora_alpha",
    "lora_dropout", "lora_target_modules", "use_rslora", "use_dora", "dataset_name", "dataset_split",
    "mix_dataset_name", "mix_share", "max_train_rows", "drop_invalid_rows", "overlong_policy", "validation_size",
    "validation_seed", "validation_file", "max_length", "packing", "packing_strategy", "padding_free",
    "completion_only_loss", "loss_type", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "weight_decay",
    "max_grad_norm", "num_train_epochs", "max_steps", "seed", "data_seed", "optim", "adam_beta1", "adam_beta2",
    "adam_epsilon",
)


def _names(paths) -> str:
    return ", ".join(p.name for p in paths)


def resume_target(training_args) -> str | None:
    """The checkpoint to resume from: resume_from_checkpoint is a path, or "true" for the newest sealed
    checkpoint-* in output_dir (the command line hands the flag over as a string)."""
    resume = training_args.resume_from_checkpoint
    if resume in (None, False) or str(resume).lower() == "false":
        return None
    if resume is True or str(resume).lower() == "true":
        folder = Path(training_args.output_dir)
        newest, newer = newest_sealed(folder)
        if newest is None:
            unsealed = f": {_names(newer)} were not completely written (the run died while saving)" if newer else ""
            raise SettingsError(f"resume_from_checkpoint: no complete checkpoint-* in {folder} to resume from{unsealed}")
        return str(newest)
    path = Path(resume)
    if not path.is_dir():
        raise SettingsError(f"resume_from_checkpoint={resume}: no such checkpoint folder")
    if not is_sealed(path):
        newest, _ = newest_sealed(path.parent)
        raise SettingsError(f"resume_from_checkpoint={resume}: this checkpoint was not completely written (the run died "
                            f"while saving it){f'; the newest complete one is {newest}' if newest else ''}")
    return str(path)


def set_aside_plan(output_dir: str | Path, resume_from: str | None) -> list[tuple[Path, Path]]:
    """The checkpoints newer than the one resumed, each with the name to set it aside under, so that this run's saves
    never write into them and transformers' rotation never counts them: half-written ones as checkpoint-N.incomplete,
    sealed ones (a resume from an earlier checkpoint redoes their steps) as checkpoint-N.superseded."""
    if resume_from is None:
        return []
    moves = []
    for path in checkpoints(output_dir):
        if checkpoint_step(path) > checkpoint_step(Path(resume_from)):
            suffix = ".superseded" if is_sealed(path) else ".incomplete"
            target, n = path.with_name(path.name + suffix), 1
            while target.exists():
                target, n = path.with_name(f"{path.name}{suffix}{n}"), n + 1
            moves.append((path, target))
    return moves


def run_shape(script_args, training_args, model_args, world_size: int, data_fingerprint: str | None,
              validation_fingerprint: str | None) -> dict:
    """What makes this run this run: its result-shaping settings, its data (the examples trained on, and those its
    record's validation history is measured on) and its number of processes."""
    settings = {**dataclasses.asdict(script_args), **dataclasses.asdict(model_args), **training_args.to_dict()}
    shaping = {k: settings[k] for k in RESULT_SHAPING if k in settings}
    return json.loads(json.dumps({"settings": shaping, "data_fingerprint": data_fingerprint,
                                  "validation_fingerprint": validation_fingerprint, "world_size": world_size}, default=str))


def _project_defaults() -> dict:
    """The project's own settings' defaults (ScriptArguments), as run_shape records values."""
    defaults = {f.name: f.default for f in dataclasses.fields(ScriptArguments) if f.default is not dataclasses.MISSING}
    return json.loads(json.dumps(defaults, default=str))


def resume_problems(checkpoint: str | Path, shape: dict) -> list[str]:
    """How resuming `checkpoint` with this run's shape would not continue the run checkpointed."""
    checkpoint = Path(checkpoint)
    recorded = read_seal(checkpoint)
    # A setting the project added after the seal was written is missing from it: that run had its default.
    before = {**_project_defaults(), **recorded["settings"]}
    problems = [f"{key}: {before.get(key)!r} in {checkpoint.name}, {value!r} now"
                for key, value in shape["settings"].items() if before.get(key) != value]
    if recorded.get("data_fingerprint") != shape["data_fingerprint"]:
        problems.append(f"the training examples differ from those {checkpoint.name} was trained on (same settings, "
                        "other rows: the data file changed)")
    # A seal written before validation examples were fingerprinted has no such key: nothing to compare with.
    if recorded.get("validation_fingerprint", shape["validation_fingerprint"]) != shape["validation_fingerprint"]:
        problems.append(f"the validation examples differ from those {checkpoint.name} was validated on (same settings, "
                        "other rows: the data changed): the run's validation history would mix two sets of examples")
    if recorded.get("world_size") != shape["world_size"]:
        problems.append(f"{recorded.get('world_size')} processes trained {checkpoint.name}, {shape['world_size']} now: "
                        "the data order and the global batch would change")
    missing = [name for name in TRAINING_STATE if not (checkpoint / name).is_file()]
    if missing:
        problems.append(f"{checkpoint.name} has no {', '.join(missing)}: the run would go on with a fresh optimizer "
                        "or schedule")
    return problems


def check_resume(checkpoint: str | Path, shape: dict, allow_changes: bool) -> list[str]:
    """Before weights load: a SettingsError naming how resuming `checkpoint` would not continue the run it
    checkpointed, unless allow_changes; returns the changes allowed (empty for the same run)."""
    changed = resume_problems(checkpoint, shape)
    if changed and not allow_changes:
        raise SettingsError(
            f"resume_from_checkpoint={checkpoint} would not continue the run it checkpointed:\n"
            + "\n".join(f"  - {c}" for c in changed) + "\nUndo the change, start a new run in another --output_dir, or "
            "pass --allow_changed_settings true to resume anyway (run_summary.json then records the changes)")
    return changed


class CheckpointSeal(TrainerCallback):
    """Seals each checkpoint once the Trainer's save of it has returned on every process."""

    def __init__(self, shape: dict):
        self.shape = shape

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every process has written its part (its RNG state, its shard)
        checkpoint = Path(args.output_dir) / checkpoint_name(state.global_step)
        if state.is_world_process_zero and checkpoint.is_dir():
            write_seal(checkpoint, {"step": state.global_step, **self.shape})
