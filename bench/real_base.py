"""Measurements on a real pretrained base (google/gemma-3-270m, tools/base_from_gguf.py), each printed and
written as JSON. bench/real_base.sh runs them on the GPU machine in one lease.

    python bench/real_base.py packing --recipe recipes/gemma-3-270m-alpaca.yaml --out packing.json
        the validation loss and stop metric of the untuned base, packed rows vs one example per row
    python bench/real_base.py losses --runs runs/bf16 runs/fp8 runs/nf4 --out losses.json
        per-step training loss of runs made with the same recipe and seed, each against the first
    python bench/real_base.py generation --base B --tuned T --prompts a.jsonl b.jsonl --out generation.json
        greedy generation as eval_compare.py did before (batches of 8 in file order) and as it does now
        (batches of similar length): prompts per second, and whether the answers are the same
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the alpaca_sft package, when run from a checkout

import torch


def cpu_flags() -> list[str]:
    from alpaca_sft.train.settings import cpu_overrides

    return cpu_overrides() + ([] if torch.cuda.is_available() else ["--dtype", "float32"])


def packing(args) -> dict:
    """Step 0: the same validation examples evaluated as packed rows and one example per padded row."""
    from alpaca_sft.data.dataset import build_training_data
    from alpaca_sft.models.tokenizer import load_tokenizer
    from alpaca_sft.train.run import build_trainer
    from alpaca_sft.train.checks import apply_pipeline_settings
    from alpaca_sft.train.settings import parse_settings

    results = {}
    for name, flags in (("packed", ["--packing", "true"]), ("one_per_row", ["--packing", "false", "--padding_free", "false"])):
        script_args, training_args, model_args = parse_settings(
            ["--config", args.recipe, "--output_dir", f"/tmp/real_base/packing-{name}", "--report_to", "none",
             "--per_device_eval_batch_size", str(args.eval_batch), *flags, *cpu_flags(), *shlex.split(args.flags)])
        apply_pipeline_settings(script_args, training_args)
        tokenizer = load_tokenizer(model_args.model_name_or_path)
        train, validation, _ = build_training_data(script_args, tokenizer, training_args.max_length, training_args.seed)
        trainer = build_trainer(script_args, training_args, model_args, tokenizer, train.select(range(8)), validation)
        began = time.perf_counter()
        metrics = trainer.evaluate()
        results[name] = {k: metrics[f"eval_{k}"] for k in ("loss", "eos_top1", "eos_prob", "response_ends")}
        results[name]["seconds"] = time.perf_counter() - began
        print(name, results[name], flush=True)
        del trainer
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    packed, single = results["packed"], results["one_per_row"]
    results["loss_rel_diff"] = abs(packed["loss"] - single["loss"]) / single["loss"]
    results["eos_top1_diff"] = abs(packed["eos_top1"] - single["eos_top1"])
    results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return results


def losses(args) -> dict:
    """Each run's logged training losses against the first run's, step by step."""
    histories = {}
    for run in args.runs:
        log = json.loads((Path(run) / "trainer_state.json").read_text())["log_history"]
        histories[Path(run).name] = {h["step"]: h["loss"] for h in log if "loss" in h}
        summary = json.loads((Path(run) / "run_summary.json").read_text())
        histories[Path(run).name + ":last_validation"] = summary["validation"]["last"]
    reference_name = Path(args.runs[0]).name
    reference = histories[reference_name]
    results = {"reference": reference_name, "runs": {}}
    for run in args.runs[1:]:
        name = Path(run).name
        steps = sorted(set(reference) & set(histories[name]))[: args.steps]
        diffs = [abs(histories[name][s] - reference[s]) / reference[s] for s in steps]
        results["runs"][name] = {"steps": len(steps), "max_rel_diff": max(diffs), "mean_rel_diff": sum(diffs) / len(diffs),
                                 "within_0.5%": max(diffs) <= 0.005, "last_validation": histories[name + ":last_validation"]}
        print(f"{name} vs {reference_name}: {len(steps)} logged steps, per-step loss differs by at most "
              f"{max(diffs):.3%} (mean {sum(diffs) / len(diffs):.3%})", flush=True)
    results["reference_last_validation"] = histories[reference_name + ":last_validation"]
    return results


def old_generate(model, tokenizer, prompts, max_new_tokens, batch_size=8):
    """eval_compare.py's generation before this change: batches of 8 in the file's order."""
    eos, answers = tokenizer.eos_token_id, []
    for start in range(0, len(prompts), batch_size):
        inputs = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                           padding_side="left").to(model.device)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                    pad_token_id=tokenizer.pad_token_id)
        for row in output[:, inputs["input_ids"].shape[1] :].tolist():
            answers.append(row[: row.index(eos) + 1] if eos in row else row)
    return answers


def generation(args) -> dict:
    from peft import PeftModel

    from alpaca_sft.eval.prompts import read_prompt_files
    from alpaca_sft.models.generation import generate
    from alpaca_sft.models.loading import load_model, this_process_device
    from alpaca_sft.models.tokenizer import load_tokenizer

    device = this_process_device()
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    tokenizer = load_tokenizer(args.tuned)
    prompts = [p.prompt for p in read_prompt_files(args.prompts)]
    subset = prompts[: args.old_prompts]
    results = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "prompts": len(prompts),
               "max_new_tokens": args.max_new_tokens}
    base = load_model(args.base, dtype, device=device).eval()
    tuned = PeftModel.from_pretrained(load_model(args.base, dtype, device=device), args.tuned).merge_and_unload().eval()
    for name, model in (("base", base), ("tuned", tuned)):
        began = time.perf_counter()
        before = old_generate(model, tokenizer, subset, args.max_new_tokens)
        old_rate = len(subset) / (time.perf_counter() - began)
        old_texts = [tokenizer.decode([t for t in ids if t != tokenizer.eos_token_id], skip_special_tokens=True)
                     for ids in before]
        for batch_size in args.batch_sizes:
            began = time.perf_counter()
            now = generate(model, tokenizer, prompts, args.max_new_tokens, batch_size)
            rate = len(prompts) / (time.perf_counter() - began)
            results[f"{name}_batch_{batch_size}"] = {
                "prompts_per_second": rate, "old_prompts_per_second": old_rate, "old_prompts": len(subset),
                "speedup": rate / old_rate, "same_answers_as_old": sum(a == g.text for a, g in zip(old_texts, now)),
                "mean_new_tokens": sum(g.new_tokens for g in now) / len(now),
                "stopped_by_eos": sum(g.stop == "eos" for g in now) / len(now)}
            print(name, batch_size, results[f"{name}_batch_{batch_size}"], flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("packing", "losses", "generation"))
    parser.add_argument("--recipe", default="recipes/gemma-3-270m-alpaca.yaml")
    parser.add_argument("--flags", default="", help="packing: more train_sft.py flags, one string ('--model_name_or_path m')")
    parser.add_argument("--eval_batch", type=int, default=4)
    parser.add_argument("--runs", nargs="*", default=[])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--base")
    parser.add_argument("--tuned")
    parser.add_argument("--prompts", nargs="*", default=["data/heldout_alpaca.jsonl", "data/heldout_sql.jsonl"])
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--old_prompts", type=int, default=32, help="prompts generated the old way too (it is slow)")
    parser.add_argument("--batch_sizes", type=int, nargs="*", default=[128])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = {"packing": packing, "losses": losses, "generation": generation}[args.part](args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
