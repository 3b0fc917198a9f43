"""The FP8 variants judged against bf16's own seed-to-seed spread on the real base
(bench/sessions/2026-12-06-fp8-yardstick.sh runs the whole yardstick in one GPU lease; these are its parts).

    python bench/fp8_yardstick.py runs;  python bench/fp8_yardstick.py flags fp8-attention
        the runs' names (RUNS below), and the train_sft.py flags of one, for the shell script
    python bench/fp8_yardstick.py validate --runs W/runs/bf16-seed42 W/runs/fp8 ... --out validate.json
        each run's validation loss and stop metric with its adapter on the bf16 base, beside it and merged into it
        (what users get), on the validation examples training held out
    python bench/fp8_yardstick.py table --results W/out --out W/out/fp8-yardstick.md [--speed DIR]
        one table (and its JSON beside it): every run's figures as a difference from bf16 seed 42, in bf16 seed
        spreads (|seed 43 - seed 42|), from the folder where bench/sessions/2026-12-06-fp8-yardstick.sh gathers each run's
        summary-RUN.json, comparison-*.json (eval_compare.py's, several runs each) and validate.json; with --speed, the folder of bench/speed.py's
        per-configuration JSON files: the 7B shape's tokens/s

A run's validation loss as trained is the one its own evaluations computed: with an FP8 base, through the FP8
forward, whose own error is part of it. The adapter a user gets is merged into the bf16 base; the held-out
prompts are answered by that merged model (eval_compare.py).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the alpaca_sft package, when run from a checkout

from harness import argument_parser, fp32_on_cpu, prepared_run, write_results

FP8 = ("--fp8_base", "true")
# name: train_sft.py flags on top of recipes/gemma-3-270m-alpaca.yaml. The bf16 seeds 42 and 43 measure the
# spread; each FP8 variant trains with seed 42, the recipe's.
BF16_RUNS = {"bf16-seed42": ("--seed", "42"), "bf16-seed43": ("--seed", "43")}
FP8_VARIANTS = {
    "fp8": FP8,  # the FP8 recipe: every adapted layer, e4m3 input gradients
    "fp8-down-bf16": (*FP8, "--fp8_layers", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"),
    "fp8-attention": (*FP8, "--fp8_layers", "q_proj", "k_proj", "v_proj", "o_proj"),  # the MLP in bf16
    "fp8-bf16-input-grad": (*FP8, "--fp8_input_grad", "bf16"),
}
RUNS = {**BF16_RUNS, **FP8_VARIANTS}
REFERENCE, SECOND_SEED = "bf16-seed42", "bf16-seed43"
TARGET_SPREADS, TARGET_SPEEDUP = 1.5, 1.25  # the issue's target: within 1.5 seed spreads, at >= 1.25x bf16's tokens/s


def speed_config(run: str) -> str | None:
    """The bench/speed.py configuration that times a run's settings on the 7B shape."""
    return {REFERENCE: "lora-recipe", "fp8": "lora-fp8-recipe"}.get(run, f"lora-{run}" if run in FP8_VARIANTS else None)


def validate(args) -> dict:
    """Per run: the validation loss and stop metric of the bf16 base with the run's adapter, unmerged (the bf16
    recipe's own forward) and merged into the bf16 weights as eval_compare.py merges it."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from alpaca_sft.train.run import build_trainer

    with prepared_run(args.recipe, "--output_dir", "/tmp/fp8_yardstick/validate", "--report_to", "none", *fp32_on_cpu(),
                      *shlex.split(args.flags)) as prepared:
        results = {}
        for run in map(Path, args.runs):
            trainer = build_trainer(*prepared.settings, prepared.tokenizer, prepared.dataset.select(range(8)),
                                    prepared.validation)
            loaded = set_peft_model_state_dict(trainer.model, load_file(run / "adapter_model.safetensors"))
            if loaded.unexpected_keys:
                raise SystemExit(f"{run}: its adapter does not fit the recipe's LoRA layers: {loaded.unexpected_keys[:3]}")
            results[run.name] = {"unmerged": _evaluate(trainer)}
            trainer.model.merge_adapter()  # PEFT's merge, in the base's dtype, as eval_compare.py's merge_and_unload
            results[run.name]["merged"] = _evaluate(trainer)
            print(run.name, results[run.name], flush=True)
            del trainer
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return results


def _evaluate(trainer) -> dict:
    metrics = trainer.evaluate()
    return {k: metrics[f"eval_{k}"] for k in ("loss", "eos_top1", "eos_prob", "response_ends")}


def held_out(comparison: dict, model: str) -> dict:
    """One model's figures on the held-out prompts of eval_compare.py's comparison.json: the share that stops by
    EOS, in all and per prompt file, how the other answers ended, SQL result match, mean new tokens."""
    scores = comparison["scores"][model]
    return {"stop_all": scores["stopped_by_eos"],
            **{f"stop_{group}": numbers["stopped_by_eos"] for group, numbers in scores.get("groups", {}).items()},
            **{f"answers_{name}": count for name, count in scores["classes"].items()},
            "sql_result_match": scores["sql_result_match"], "mean_new_tokens": scores["mean_new_tokens"]}


def comparisons(results: Path) -> dict[str, dict]:
    """Run name -> the comparison.json (comparison-*.json in `results`) that holds its model: eval_compare.py
    judges several runs beside one base per call, each under its folder's name."""
    found = {}
    for path in sorted(results.glob("comparison-*.json")):
        comparison = json.loads(path.read_text())
        found.update({name: comparison for name in comparison["scores"] if name != "base"})
    return found


def stop_paired(a: dict, b: dict, model_a: str, model_b: str) -> dict:
    """Stop by EOS of two models on the same prompts (possibly from two comparison.json files): the prompts only
    one of them stops on, each way, and McNemar's exact p-value."""
    from alpaca_sft.eval.stats import mcnemar_exact

    stops_b = {p["id"]: p[model_b]["stop"] == "eos" for p in b["prompts"]}
    pairs = [(p[model_a]["stop"] == "eos", stops_b[p["id"]]) for p in a["prompts"] if p["id"] in stops_b]
    only_a, only_b = sum(x and not y for x, y in pairs), sum(y and not x for x, y in pairs)
    return {"prompts": len(pairs), "only_reference": only_a, "only_run": only_b, "p_value": mcnemar_exact(only_a, only_b)}


def run_figures(results: Path, runs: list[str], speed: Path | None) -> dict:
    """Every run's figures, keyed like METRICS, from its run_summary.json, the validate part's results, its
    comparison.json and, with `speed`, bench/speed.py's JSON of its configuration."""
    validate_file = results / "validate.json"  # absent if that part failed: its columns say n/a
    validated = json.loads(validate_file.read_text()) if validate_file.is_file() else {}
    figures, judged = {}, comparisons(results)
    for run in runs:
        summary = json.loads((results / f"summary-{run}.json").read_text())
        as_trained, first = summary["validation"]["last"], summary["validation"]["evaluations"][0]
        comparison = judged[run]
        merged, unmerged = (validated.get(run, {}).get(way, {}) for way in ("merged", "unmerged"))
        figures[run] = {
            "val_loss_as_trained": as_trained["loss"], "eos_top1_as_trained": as_trained["eos_top1"],
            # before any step (LoRA's B is zero): the run's base alone, so an FP8 forward's own error
            "val_loss_step0": first["loss"] if first["step"] == 0 else None,
            "val_loss_bf16_base": merged.get("loss"), "eos_top1_bf16_base": merged.get("eos_top1"),
            "val_loss_bf16_base_unmerged": unmerged.get("loss"),
            **held_out(comparison, run),
            "paired_stop": stop_paired(judged[REFERENCE], comparison, REFERENCE, run),
            "peak_gpu_memory_gib": summary.get("peak_gpu_memory_gib"),
            "fp8_gap": comparison["models"][run].get("fp8_gap"),
        }
        config = speed_config(run)
        if speed and config and (speed / f"{config}.json").is_file():
            rates = json.loads((speed / f"{config}.json").read_text()).get("tokens_per_second") or {}
            figures[run]["tokens_per_second_7b"] = rates.get("last_logged")
    return figures


# (key, label, format): the table's columns, each judged in bf16 seed spreads
METRICS = [
    ("val_loss_as_trained", "validation loss, as trained", "{:.4f}"),
    ("val_loss_bf16_base", "validation loss, bf16 base + adapter (merged)", "{:.4f}"),
    ("eos_top1_bf16_base", "EOS top-1 at response ends (merged)", "{:.1%}"),
    ("stop_all", "held-out stop by EOS: all", "{:.1%}"),
    ("sql_result_match", "SQL result = reference's", "{:.1%}"),
    ("mean_new_tokens", "mean new tokens", "{:.1f}"),
]


def distances(figures: dict) -> dict:
    """Per run and metric: the difference from bf16 seed 42, and its size in seed spreads (where the two bf16
    seeds agree exactly: 0 for no difference, else None)."""
    keys = [k for k in figures[REFERENCE] if k.startswith(("val_", "eos_", "stop_", "sql_", "mean_"))]
    result = {}
    for run, values in figures.items():
        result[run] = {}
        for key in keys:
            reference, second = figures[REFERENCE].get(key), figures[SECOND_SEED].get(key)
            if values.get(key) is None or reference is None or second is None:
                continue
            spread = abs(second - reference)
            difference = values[key] - reference
            result[run][key] = {"difference": difference, "spread": spread,
                                "spreads": abs(difference) / spread if spread else (0.0 if difference == 0 else None)}
    return result


def verdict(run: str, figures: dict, distance: dict) -> str:
    """Whether a run meets the issue's target: validation loss (bf16 base + adapter) and held-out stop rate
    within TARGET_SPREADS seed spreads of bf16, at TARGET_SPEEDUP its tokens/s on the 7B shape."""
    close = all((distance.get(k) or {}).get("spreads") is not None and distance[k]["spreads"] <= TARGET_SPREADS
                for k in ("val_loss_bf16_base", "stop_all"))
    rate, bf16_rate = figures[run].get("tokens_per_second_7b"), figures[REFERENCE].get("tokens_per_second_7b")
    if not rate or not bf16_rate:
        return ("close" if close else "not close") + ", speed not measured"
    fast = rate / bf16_rate >= TARGET_SPEEDUP
    return "**meets the target**" if close and fast else f"{'close' if close else 'not close'}, {'fast' if fast else 'slow'}"


def table(figures: dict) -> str:
    """The markdown table: a row per run, each cell its value (difference from bf16 seed 42; distance in spreads)."""
    distance = distances(figures)
    stop_files = [k for k in figures[REFERENCE] if k.startswith("stop_") and k != "stop_all"]
    columns = METRICS[:4] + [(k, f"held-out stop: {k[5:]}", "{:.1%}") for k in stop_files] + METRICS[4:]

    def cell(run, key, pattern):
        value = figures[run].get(key)
        if value is None:
            return "n/a"
        d = distance[run].get(key)
        if run == REFERENCE or d is None:
            return pattern.format(value)
        spreads = "seeds agree" if d["spreads"] is None else f"{d['spreads']:.1f} spreads"
        sign = "+" if d["difference"] >= 0 else "-"
        return f"{pattern.format(value)} ({sign}{pattern.format(abs(d['difference']))}; {spreads})"

    header = ["run", *(label for _, label, _ in columns), f"stop vs {REFERENCE}: only it / only run (McNemar p)",
              "answers that loop / run on / are cut", "tokens/s, 7B shape (x bf16)", "target"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 2) + "---|"]
    bf16_rate = figures[REFERENCE].get("tokens_per_second_7b")
    for run in figures:
        rate = figures[run].get("tokens_per_second_7b")
        speed = f"{rate:,.0f} ({rate / bf16_rate:.2f}x)" if rate and bf16_rate else "n/a"
        target = {REFERENCE: "the reference", SECOND_SEED: "the spread"}.get(run) or verdict(run, figures, distance[run])
        paired = figures[run]["paired_stop"]
        against = "" if run == REFERENCE else f"{paired['only_reference']} / {paired['only_run']} ({paired['p_value']:.2g})"
        endings = " / ".join(str(figures[run].get(f"answers_{c}", "n/a")) for c in ("looped", "ran_on", "cut"))
        lines.append(f"| {run} | " + " | ".join(cell(run, k, p) for k, _, p in columns)
                     + f" | {against} | {endings} | {speed} | {target} |")
    spread_row = [pattern.format(distance[SECOND_SEED][k]["spread"]) if k in distance[SECOND_SEED] else "n/a"
                  for k, _, pattern in columns]
    lines.append("| bf16 seed spread, \\|43 - 42\\| | " + " | ".join(spread_row) + " | | | | |")
    return "\n".join(lines)


def report(args) -> dict:
    judged = comparisons(args.results)
    runs = [r for r in RUNS if r in judged]
    missing = [r for r in (REFERENCE, SECOND_SEED) if r not in runs]
    if missing:
        raise SystemExit(f"{', '.join(missing)} judged in no comparison-*.json of {args.results}: the bf16 seeds are "
                         "the yardstick")
    figures = run_figures(args.results, runs, args.speed)
    step0 = [f"{r} {figures[r]['val_loss_step0'] - figures[REFERENCE]['val_loss_step0']:+.4f}" for r in FP8_VARIANTS
             if r in figures and None not in (figures[r]["val_loss_step0"], figures[REFERENCE]["val_loss_step0"])]
    text = "\n\n".join([
        f"FP8 variants against bf16's seed spread: {len(runs)} runs of recipes/gemma-3-270m-alpaca.yaml "
        f"(`bash bench/sessions/2026-12-06-fp8-yardstick.sh`). Each cell: the value (its difference from {REFERENCE}; "
        f"the difference in bf16 seed spreads, |{SECOND_SEED} - {REFERENCE}|). Target: validation loss (bf16 base + adapter) and "
        f"held-out stop rate within {TARGET_SPREADS} spreads, at >= {TARGET_SPEEDUP}x the bf16 recipe's tokens/s.",
        table(figures),
        "Validation loss as trained: the run's own last evaluation (an FP8 run's through its FP8 forward). bf16 base + "
        "adapter: the adapter merged into the bf16 base, as users get it. Held-out figures: eval_compare.py, the "
        "merged bf16 model. bf16 runs' validation loss recomputed here with the adapter unmerged, against their own: "
        + ", ".join(f"{r} {figures[r]['val_loss_bf16_base_unmerged'] - figures[r]['val_loss_as_trained']:+.1e}"
                    for r in BF16_RUNS if r in figures and figures[r]["val_loss_bf16_base_unmerged"] is not None) + ".",
        *([f"The FP8 forward's own error, validation loss at step 0 (before any step) against {REFERENCE}'s: "
           + ", ".join(step0) + "."] if step0 else []),
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return {"runs": figures, "distances": distances(figures),
            "flags": {r: list(RUNS[r]) for r in runs}, "target": {"spreads": TARGET_SPREADS, "speedup": TARGET_SPEEDUP}}


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("part", choices=("runs", "flags", "validate", "table"))
    parser.add_argument("name", nargs="?", help="flags: the run's name")
    parser.add_argument("--recipe", default="recipes/gemma-3-270m-alpaca.yaml")
    parser.add_argument("--flags", default="", help="validate: more train_sft.py flags, one string (the rehearsal's)")
    parser.add_argument("--runs", nargs="*", default=[], help="validate: the runs' output folders")
    parser.add_argument("--results", type=Path, help="table: the folder of summary-RUN.json, comparison-*.json, validate.json")
    parser.add_argument("--speed", type=Path, help="table: the folder of bench/speed.py's per-configuration JSON files")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.part == "runs":
        print(" ".join(RUNS))
        return
    if args.part == "flags":
        if args.name not in RUNS:
            raise SystemExit(f"no run {args.name!r}: the runs are {', '.join(RUNS)}")
        print(shlex.join(RUNS[args.name]))
        return
    results = validate(args) if args.part == "validate" else report(args)
    write_results(args.out if args.part == "validate" else args.out.with_suffix(".json"), results)


if __name__ == "__main__":
    main()
