"""The merged model's card, through huggingface_hub's ModelCard: metadata the Hub reads (base model,
data set, license, the comparison's numbers as eval results) and a body that says how it was made."""

from __future__ import annotations

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..eval.report import METRICS, SPEEDS, summary_table
from ..run_folder.record import RunRecord, RunSummary

RECIPE_KEYS = ("model_name_or_path", "dataset_name", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
               "load_in_4bit", "max_length", "packing", "num_train_epochs", "learning_rate",
               "per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type", "seed")
TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}\n"


def model_card(base: str, record: RunRecord | None, scores: dict, prompts_file: str, model_name: str,
               eos_token: str = "</s>") -> ModelCard:
    recipe, summary = (record.settings, record.summary) if record else ({}, None)
    dataset = record.dataset_name if record and record.dataset_name else "tatsu-lab/alpaca"
    mixed = record.mix_dataset_name if record else None
    alpaca = "alpaca" in dataset.lower()
    tuned = scores.get("tuned", {})
    results = [
        EvalResult(task_type="text-generation", dataset_type="json", dataset_name=prompts_file, metric_type=key,
                   metric_name=label, metric_value=round(tuned[key], 4))
        for key, label, _ in METRICS if tuned.get(key) is not None and key not in SPEEDS
    ]
    data = ModelCardData(base_model=base, datasets=[dataset] + ([mixed] if mixed else []),
                         license="cc-by-nc-4.0" if alpaca else "other",
                         library_name="transformers", tags=["sft", "trl", "peft", "lora", "alpaca"],
                         model_name=model_name, eval_results=results or None)
    precision = record.precision.kind if record and record.precision else None
    adapter = {"4-bit": "QLoRA", "FP8": "FP8-base LoRA"}.get(precision, "LoRA")
    mix = f", with `{mixed}` mixed in ({record.mix_share:.0%} of the examples)" if mixed else ""
    lines = [
        f"# {base.split('/')[-1]} instruction-tuned on {dataset}", "",
        f"`{base}` with a {adapter} adapter trained by TRL's SFTTrainer on Alpaca-formatted instructions "
        "(completion-only loss: the response and its EOS), then merged into the full-precision base weights.", "",
        "## Data and license", "",
        f"Trained on `{dataset}`{mix}." + (" The Alpaca data set is CC BY-NC 4.0: this model is for non-commercial use." if alpaca else ""),
        "", "## Prompt", "",
        f"The Stanford Alpaca template, ending in `### Response:\\n`; the model answers and emits `{eos_token}`.", "",
    ]
    if recipe:
        lines += ["## Recipe", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | `{recipe[k]}` |" for k in RECIPE_KEYS if k in recipe] + [""]
    if summary:
        lines += ["## Training", "",
                  f"- examples: {summary.rows_kept} kept of {summary.rows_read} read; "
                  f"{summary.trained_tokens} trained tokens of {summary.total_tokens}",
                  f"- steps: {summary.steps}, loss {summary.first_loss} -> {summary.last_loss}",
                  f"- throughput: {summary.tokens_per_second:,.0f} tokens/s; peak GPU memory "
                  f"{summary.peak_gpu_memory_gib} GiB" if summary.tokens_per_second else "- throughput: not recorded"]
        lines += _validation_lines(summary) + [""]
    if scores:
        lines += [f"## Base vs tuned (greedy, same prompts: `{prompts_file}`)", "", summary_table(scores), ""]
    return ModelCard.from_template(data, template_str=TEMPLATE, body="\n".join(lines))


def _validation_lines(summary: RunSummary) -> list[str]:
    """The validation loss and the stop metric (EOS top-1 and p(EOS) where validation responses end),
    first and last evaluation, and the greedy answers after training."""
    lines = []
    if summary.evaluations:
        first, last = summary.evaluations[0], summary.evaluations[-1]
        examples = summary.validation_examples if summary.validation_examples is not None else "?"
        lines.append(f"- validation ({examples} examples {summary.validation_source}): loss "
                     f"{first.loss:.4f} at step {first.step} -> {last.loss:.4f} at step {last.step}")
        if last.eos_top1 is not None:
            lines.append(f"- stop metric where validation responses end: EOS the most likely next token "
                         f"{first.eos_top1:.0%} -> {last.eos_top1:.0%}, mean p(EOS) "
                         f"{first.eos_prob:.3f} -> {last.eos_prob:.3f}")
    samples = summary.samples
    if samples:
        lines.append(f"- greedy answers to {samples.prompts} validation prompts after training: "
                     f"{samples.stopped_by_eos} stopped by EOS, {samples.mean_new_tokens:.1f} new tokens on average")
    return lines
