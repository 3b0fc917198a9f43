"""Measurements on a real pretrained base (google/gemma-3-270m, tools/base_from_gguf.py), each printed and
written as JSON. bench/sessions/2026-12-01-real-base.sh runs them on the GPU machine in one lease (generation
speed: bench/generation_speed.py).

    python bench/real_base.py packing --recipe recipes/gemma-3-270m-alpaca.yaml --out packing.json
        the validation loss and stop metric of the untuned base, packed rows vs one example per row
    python bench/real_base.py losses --runs runs/bf16 runs/fp8 runs/nf4 --out losses.json
        per-step training loss of runs made with the same recipe and seed, each against the first
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the alpaca_sft package, when run from a checkout

import torch

from harness import argument_parser, fp32_on_cpu, device_name, prepared_run, write_results


def packing(args) -> dict:
    """Step 0: the same validation examples evaluated as packed rows and one example per padded row."""
    from alpaca_sft.train.run import build_trainer

    results = {}
    for name, flags in (("packed", ["--packing", "true"]), ("one_per_row", ["--packing", "false", "--padding_free", "false"])):
        with prepared_run(args.recipe, "--output_dir", f"/tmp/real_base/packing-{name}", "--report_to", "none",
                          "--per_device_eval_batch_size", args.eval_batch, *flags, *fp32_on_cpu(),
                          *shlex.split(args.flags)) as run:
            trainer = build_trainer(*run.settings, run.tokenizer, run.dataset.select(range(8)), run.validation)
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
    results["device"] = device_name()
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


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("part", choices=("packing", "losses"))
    parser.add_argument("--recipe", default="recipes/gemma-3-270m-alpaca.yaml")
    parser.add_argument("--flags", default="", help="packing: more train_sft.py flags, one string ('--model_name_or_path m')")
    parser.add_argument("--eval_batch", type=int, default=4)
    parser.add_argument("--runs", nargs="*", default=[])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = {"packing": packing, "losses": losses}[args.part](args)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
