"""What a run leaves in output_dir: the finished adapter (gathered whole, then checked), its
resolved config and run_summary.json."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file

RUN_MARKERS = ("adapter_config.json", "run_summary.json", "model.safetensors", "trainer_state.json")
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger-kernel", "flash-attn")


def holds_a_run(output_dir: str | Path) -> bool:
    path = Path(output_dir)
    return path.is_dir() and (any((path / m).exists() for m in RUN_MARKERS) or any(path.glob("checkpoint-*")))


def save_resolved_config(path: Path, script_args, training_args, model_args) -> None:
    """Every setting the run used, defaults included, as one YAML that train_sft.py accepts back
    with --config. Tokens are left out: they come from the environment or the login cache."""
    script = dataclasses.asdict(script_args)
    script.pop("preview", None)
    config = {**script, **dataclasses.asdict(model_args), **training_args.to_dict()}
    config = {k: v for k, v in config.items() if not k.endswith("_token") and not k.startswith("_")}
    config.pop("resume_from_checkpoint", None)
    path.write_text(yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=True))


class IncompleteAdapterError(RuntimeError):
    """The adapter on disk is not what was trained: a tensor missing, cut to one process's shard, or different."""


def save_adapter(model, output_dir: Path, tokenizer, is_main_process: bool) -> None:
    """Write the trained adapter whole, whatever launched the run, and prove it by reading it back.

    Under DDP every process holds the whole adapter, but under FSDP each holds a slice of every LoRA
    tensor, and transformers' Trainer.save_model writes nothing at all with FSDP's sharded state
    dict. torch's get_model_state_dict gathers the trainable tensors at full shape onto the main
    process (a collective: every process must call this), and PEFT writes them in its own format.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    trained = get_model_state_dict(model, options=options)
    if is_main_process:
        model.save_pretrained(output_dir, state_dict=trained)
        tokenizer.save_pretrained(output_dir)
        model.generation_config.save_pretrained(output_dir)
        check_adapter(output_dir, model, trained)


def check_adapter(output_dir: Path, model, trained: dict[str, torch.Tensor]) -> None:
    """The adapter file holds every trainable tensor of `model`, each at its full (unsharded)
    shape and equal to `trained`; otherwise IncompleteAdapterError names what is wrong."""
    from peft import get_peft_model_state_dict

    # PEFT's own key mapping, applied to the full shapes (a DTensor's .shape is the global one).
    shapes = {name: torch.empty(p.shape, device="meta") for name, p in model.named_parameters() if p.requires_grad}
    expected = get_peft_model_state_dict(model, state_dict=shapes)
    values = get_peft_model_state_dict(model, state_dict=trained)
    path = Path(output_dir) / "adapter_model.safetensors"
    saved = load_file(path) if path.is_file() else {}
    problems = [f"{key}: missing" for key in expected if key not in saved]
    problems += [f"{key}: not a trained tensor" for key in saved if key not in expected]
    for key, shape in ((k, tuple(v.shape)) for k, v in expected.items() if k in saved):
        if tuple(saved[key].shape) != shape:
            problems.append(f"{key}: shape {list(saved[key].shape)}, the trained tensor is {list(shape)}")
        elif not torch.equal(saved[key], values[key].to(saved[key].dtype)):
            problems.append(f"{key}: differs from the trained tensor")
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:10]) + (f"\n  ... {len(problems) - 10} more" if len(problems) > 10 else "")
        raise IncompleteAdapterError(f"the adapter saved to {path} is not what was trained:\n{shown}")


def peak_gpu_memory_per_process() -> list[float] | None:
    """Each process's peak allocated GPU memory in GiB, gathered to every process (a collective)."""
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    if not (dist.is_available() and dist.is_initialized()):
        return [peak]
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    return peaks


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_summary(trainer, progress, data_report, started: float, attn_implementation: str, stopped: str | None,
                peak_gib_per_process: list[float] | None) -> dict:
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    final = next((h for h in reversed(history) if "train_runtime" in h), {})
    tokens_seen = next((h["num_tokens"] for h in reversed(history) if "num_tokens" in h), None)
    return {
        "status": stopped or "completed",
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "epoch": trainer.state.epoch,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "mean_loss": final.get("train_loss"),
        "tokens_seen": tokens_seen,
        "tokens_per_second": {
            "mean_over_run": (tokens_seen / final["train_runtime"]) if tokens_seen and final.get("train_runtime") else None,
            "last_logged": progress.rates[-1] if progress.rates else None,
            # the second half of the logged windows: past compilation and warm-up
            "steady": statistics.fmean(progress.rates[len(progress.rates) // 2 :]) if progress.rates else None,
        },
        "train_runtime_s": final.get("train_runtime"),
        "wall_time_s": time.time() - started,
        "peak_gpu_memory_gib": max(peak_gib_per_process) if peak_gib_per_process else None,
        "peak_gpu_memory_gib_per_process": peak_gib_per_process,
        "attn_implementation": attn_implementation,
        "world_size": trainer.args.world_size,
        "data": data_report.to_dict(),
        "versions": library_versions(),
    }


def write_json(path: Path, payload: dict) -> None:
    def clean(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    path.write_text(json.dumps({k: clean(v) for k, v in payload.items()}, indent=2, default=str))
