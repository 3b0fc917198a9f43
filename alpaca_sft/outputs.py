"""What a run leaves in output_dir besides the adapter: its resolved config and run_summary.json."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import time
from pathlib import Path

import torch
import yaml

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


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_summary(trainer, progress, data_report, started: float, attn_implementation: str, stopped: str | None) -> dict:
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
        },
        "train_runtime_s": final.get("train_runtime"),
        "wall_time_s": time.time() - started,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "attn_implementation": attn_implementation,
        "world_size": trainer.args.world_size,
        "data": data_report.to_dict(),
        "versions": library_versions(),
    }


def write_json(path: Path, payload: dict) -> None:
    def clean(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    path.write_text(json.dumps({k: clean(v) for k, v in payload.items()}, indent=2, default=str))
