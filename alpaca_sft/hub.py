"""The merged model's card, and its upload through huggingface_hub.

The token is never handled here: huggingface_hub reads HF_TOKEN or the login cache itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from .evaluation import summary_table

CARD_RECIPE_KEYS = ("model_name_or_path", "dataset_name", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                    "load_in_4bit", "max_length", "packing", "num_train_epochs", "learning_rate",
                    "per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type", "seed")


class PushError(RuntimeError):
    pass


def model_card(base: str, adapter_dir: Path | None, scores: dict) -> str:
    recipe, summary = {}, {}
    if adapter_dir is not None and (adapter_dir / "train_config.yaml").is_file():
        recipe = yaml.safe_load((adapter_dir / "train_config.yaml").read_text()) or {}
    if adapter_dir is not None and (adapter_dir / "run_summary.json").is_file():
        summary = json.loads((adapter_dir / "run_summary.json").read_text())
    dataset = recipe.get("dataset_name", "tatsu-lab/alpaca")
    front = {
        "base_model": base,
        "datasets": [dataset],
        "license": "cc-by-nc-4.0" if dataset == "tatsu-lab/alpaca" else "other",
        "library_name": "transformers",
        "tags": ["sft", "trl", "peft", "lora", "alpaca"],
    }
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {base.split('/')[-1]} instruction-tuned on {dataset}", "",
        f"`{base}` with a {'QLoRA' if recipe.get('load_in_4bit') else 'LoRA'} adapter trained by TRL's SFTTrainer "
        "on Alpaca-formatted instructions (completion-only loss: the response and its EOS), then merged "
        "into the full-precision base weights.", "",
        "## Data and license", "",
        f"Trained on `{dataset}`."
        + (" The Alpaca data set is CC BY-NC 4.0: this model is for non-commercial use." if dataset == "tatsu-lab/alpaca" else ""),
        "",
        "## Prompt", "",
        "The Stanford Alpaca template, ending in `### Response:\\n`; the model answers and emits `</s>`.", "",
    ]
    if recipe:
        lines += ["## Recipe", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | `{recipe[k]}` |" for k in CARD_RECIPE_KEYS if k in recipe] + [""]
    if summary:
        data = summary.get("data", {})
        rate = (summary.get("tokens_per_second") or {}).get("mean_over_run")
        lines += ["## Training", "",
                  f"- examples: {data.get('rows_kept')} kept of {data.get('rows_read')} read; "
                  f"{data.get('trained_tokens')} trained tokens of {data.get('total_tokens')}",
                  f"- steps: {summary.get('global_step')}, loss {summary.get('first_loss')} -> {summary.get('last_loss')}",
                  f"- throughput: {rate:,.0f} tokens/s; peak GPU memory {summary.get('peak_gpu_memory_gib')} GiB; "
                  f"wall time {summary.get('wall_time_s', 0):.0f} s" if rate else "- throughput: not recorded",
                  ""]
    if scores:
        lines += ["## Base vs tuned (greedy, same prompts)", "", summary_table(scores), ""]
    return "\n".join(lines)


def push(folder: Path, repo_id: str, private: bool) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="Upload merged model from alpaca-sft")
    except Exception as err:
        message = str(err)
        token = os.environ.get("HF_TOKEN")
        if token:
            message = message.replace(token, "***")
        raise PushError(
            f"push to {repo_id} failed: {message}\nThe merged model is complete in {folder}. Retry with:\n"
            f"  hf upload {repo_id} {folder} .{' --private' if private else ''}"
        ) from None
    return getattr(commit, "commit_url", None) or str(commit)
