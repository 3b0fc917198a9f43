"""What a run leaves in output_dir beside its adapter: train_config.yaml (every setting, a recipe in itself) and
run_summary.json (what happened, across interruptions); run_folder/record.py reads them back."""

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

from ..run_folder.layout import write_atomically

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger-kernel", "flash-attn")


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


def run_summary(trainer, data_report, started: float, status: str, **facts) -> dict:
    """The run's record, from the Trainer's log history, which a checkpoint carries: a resumed run
    is described whole, from its first step. tokens/s is steady when measured over the second half
    of the logged windows (past compilation and warm-up)."""
    state = trainer.state
    logged = [h for h in state.log_history if "loss" in h]
    rates = [h["tokens_per_second"] for h in logged if "tokens_per_second" in h]
    train_seconds = logged[-1].get("train_seconds") if logged else None
    tokens = state.num_input_tokens_seen
    evaluations = [{"step": h["step"], "loss": h["eval_loss"], "eos_top1": h.get("eval_eos_top1"),
                    "eos_prob": h.get("eval_eos_prob"), "seconds": h.get("eval_runtime")}
                   for h in state.log_history if "eval_loss" in h]
    return {
        "status": status,
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "epoch": state.epoch,
        "first_loss": logged[0]["loss"] if logged else None,
        "last_loss": logged[-1]["loss"] if logged else None,
        "mean_logged_loss": statistics.fmean(h["loss"] for h in logged) if logged else None,
        "tokens_seen": tokens,
        "tokens_per_second": {
            "mean_over_run": tokens / train_seconds if tokens and train_seconds else None,
            "steady": statistics.fmean(rates[len(rates) // 2 :]) if rates else None,
            "last_logged": rates[-1] if rates else None,
        },
        "train_seconds": train_seconds,
        "validation": {"evaluations": evaluations, "last": evaluations[-1] if evaluations else None,
                       "seconds": sum(e["seconds"] or 0.0 for e in evaluations)},
        "wall_time_s": time.time() - started,  # of this session, loading included
        "world_size": trainer.args.world_size,
        "data": data_report.to_dict(),
        "versions": library_versions(),
        **facts,
    }


def write_json(path: Path, payload: dict) -> None:
    def clean(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    write_atomically(path, json.dumps({k: clean(v) for k, v in payload.items()}, indent=2, default=str))
