"""Does an FP8 (or NF4) base train like the bf16 one? On the GPU, from the same initialization and batches:

  1. the first packed row's loss and LoRA gradients with the base in fp32, bf16 and FP8, in one process
     (each model the one before it, converted in place), and with --nf4 in NF4 (a 4-bit load given the
     same LoRA weights): cosine similarity of all LoRA gradients together and of each tensor, against
     bf16 and against fp32;
  2. per-step training loss over --steps optimizer steps of train_sft.py, once with
     recipes/mistral-7b-lora.yaml and once with recipes/mistral-7b-lora-fp8.yaml (same seed, so the same
     LoRA initialization and batch order; one micro-batch per step, no validation).

    python bench/fp8_numerics.py --model /tmp/smoke/mistral-7b --data /tmp/smoke/alpaca.jsonl \
        --out bench/results/fp8/numerics.json
    python bench/fp8_numerics.py --parts first_step --nf4 --recipe recipes/gemma-3-270m-alpaca.yaml \
        --model build/gemma-3-270m --data build/real-data/alpaca_train.jsonl --out first_step.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the alpaca_sft package, when run from a checkout

import torch
from peft.helpers import disable_input_dtype_casting

from alpaca_sft.kernels import fp8_base
from alpaca_sft.kernels.fp8_base import Fp8FrozenLinear, quantize_frozen_base


def first_step(args) -> dict:
    """One packed row's loss and LoRA gradients with the base in fp32 (the reference), in bf16 (the
    recipe), then in FP8, all from the same weights: the FP8 base's distance from bf16 set beside
    bf16's own distance from fp32."""
    from alpaca_sft.data.dataset import build_dataset
    from alpaca_sft.models.tokenizer import load_tokenizer
    from alpaca_sft.train.run import build_trainer
    from alpaca_sft.train.checks import apply_pipeline_settings
    from alpaca_sft.train.settings import cpu_overrides, parse_settings

    def settings(*flags):
        parsed = parse_settings(
            ["--config", args.recipe, "--model_name_or_path", args.model, "--dataset_name", args.data,
             "--output_dir", "/tmp/fp8_numerics/first_step", "--report_to", "none", "--validation_size", "0",
             "--drop_invalid_rows", "true",
             *cpu_overrides(),
             *flags])
        apply_pipeline_settings(*parsed[:2])  # validation_size 0: validation off
        return parsed

    script_args, training_args, model_args = settings("--dtype", "float32")
    tokenizer = load_tokenizer(args.model)
    dataset, _ = build_dataset(args.data, tokenizer, max_length=training_args.max_length, max_rows=args.rows,
                               drop_invalid_rows=True)
    trainer = build_trainer(script_args, training_args, model_args, tokenizer, dataset)
    model = trainer.model
    model.train()
    if args.residual_branch_scale != 1:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("o_proj.base_layer.weight", "down_proj.base_layer.weight")):
                    p.mul_(args.residual_branch_scale)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    batch = {k: v.to(trainer.args.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def loss_and_grads(autocast: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast(trainer.args.device.type, dtype=torch.bfloat16, enabled=autocast), disable_input_dtype_casting(model):
            loss = trainer.compute_loss(model, batch)
        loss.backward()
        return loss.item(), {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}

    runs = {"fp32": loss_and_grads(autocast=False)}
    for name, p in model.named_parameters():  # the base to bf16, as the recipe loads it; LoRA's weights stay fp32
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    runs["bf16"] = loss_and_grads(autocast=True)
    converted = quantize_frozen_base(model)
    runs["fp8"] = loss_and_grads(autocast=True)
    default = fp8_base.FAST_ACCUMULATION_FORWARD, fp8_base.FAST_ACCUMULATION_INPUT_GRAD
    for name, fast in (("fp8_precise", False), ("fp8_fast_accumulation_everywhere", True)):
        fp8_base.FAST_ACCUMULATION_FORWARD = fp8_base.FAST_ACCUMULATION_INPUT_GRAD = fast
        runs[name] = loss_and_grads(autocast=True)
    fp8_base.FAST_ACCUMULATION_FORWARD, fp8_base.FAST_ACCUMULATION_INPUT_GRAD = default
    # The same bf16 math with the weights rounded to their e4m3 values: how much of FP8's distance from
    # bf16 the weights' rounding alone makes, with no FP8 GEMM and no quantized activation or gradient.
    for layer in [m for m in model.modules() if isinstance(getattr(m, "base_layer", None), Fp8FrozenLinear)]:
        fp8_layer, rounded = layer.base_layer, torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
        rounded.weight = torch.nn.Parameter(fp8_layer.dequantized_weight().to(torch.bfloat16), requires_grad=False)
        layer.base_layer = rounded
    runs["bf16_e4m3_weights"] = loss_and_grads(autocast=True)
    if args.nf4:  # a 4-bit load of the same base, given the same LoRA weights: QLoRA's first step
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        lora = get_peft_model_state_dict(model)
        trainer = model = None  # the FP8 model's memory, before the 4-bit one loads
        trainer = build_trainer(*settings("--dtype", "bfloat16", "--load_in_4bit", "true"), tokenizer, dataset)
        model = trainer.model
        set_peft_model_state_dict(model, lora)
        model.train()
        runs["nf4"] = loss_and_grads(autocast=True)

    # PEFT starts B at zero, so on the first step every A's gradient is exactly zero: compared are the Bs
    names = [n for n, g in runs["fp32"][1].items() if g.abs().max() > 0]
    cosine = torch.nn.functional.cosine_similarity

    def compare(a: str, b: str) -> dict:
        (loss_a, grads_a), (loss_b, grads_b) = runs[a], runs[b]
        per_tensor = sorted(cosine(grads_a[n].flatten().double(), grads_b[n].flatten().double(), dim=0).item() for n in names)
        flat = [torch.cat([g[n].flatten() for n in names]).double() for g in (grads_a, grads_b)]
        return {"loss_rel_diff": abs(loss_b - loss_a) / loss_a, "grad_cosine_all": cosine(*flat, dim=0).item(),
                "grad_cosine_worst_tensor": per_tensor[0], "grad_cosine_median_tensor": per_tensor[len(per_tensor) // 2]}

    return {"tokens": int(batch["input_ids"].numel()), "layers_in_fp8": converted,
            "residual_branch_scale": args.residual_branch_scale,
            "lora_tensors": len(runs["fp32"][1]), "compared_tensors": len(names),
            "loss": {name: run[0] for name, run in runs.items()},
            "bf16_vs_fp32": compare("fp32", "bf16"), "fp8_vs_fp32": compare("fp32", "fp8"), "fp8_vs_bf16": compare("bf16", "fp8"),
            "fp8_precise_vs_fp32": compare("fp32", "fp8_precise"),
            "fp8_fast_accumulation_everywhere_vs_fp32": compare("fp32", "fp8_fast_accumulation_everywhere"),
            "fp8_settings": {"fast_accumulation_forward": default[0], "fast_accumulation_input_grad": default[1]},
            "bf16_e4m3_weights_vs_bf16": compare("bf16", "bf16_e4m3_weights"),
            **({"nf4_vs_fp32": compare("fp32", "nf4"), "nf4_vs_bf16": compare("bf16", "nf4")} if args.nf4 else {})}


def losses(args, recipe: str, name: str) -> list[float]:
    output = Path("/tmp/fp8_numerics") / name
    command = [sys.executable, "train_sft.py", "--config", recipe, "--model_name_or_path", args.model,
               "--dataset_name", args.data, "--output_dir", str(output), "--overwrite_output_dir", "true",
               "--max_train_rows", str(args.rows), "--max_steps", str(args.steps), "--gradient_accumulation_steps", "1",
               "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--validation_size", "0",
               "--eval_strategy", "no", "--eval_on_start", "false", "--samples_at_end", "0"]
    with open(Path("/tmp/fp8_numerics") / f"{name}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--rows", type=int, default=6000, help="records to tokenize and pack")
    parser.add_argument("--recipe", default="recipes/mistral-7b-lora.yaml", help="the bf16 recipe the bases are judged in")
    parser.add_argument("--nf4", action="store_true", help="first_step: an NF4 (4-bit) base too, beside FP8")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--residual_branch_scale", type=float, default=1.0,
                        help="first_step: multiply o_proj's and down_proj's weights by this (0.125 = 1/sqrt(2 x 32 layers), "
                             "GPT-2's scaled init: each block then adds a small update to the residual stream, as in "
                             "trained models, instead of doubling it as a plain random init does)")
    parser.add_argument("--parts", nargs="*", default=["first_step", "losses"], choices=["first_step", "losses"])
    parser.add_argument("--out", type=Path, default=Path("bench/results/fp8/numerics.json"))
    args = parser.parse_args()
    Path("/tmp/fp8_numerics").mkdir(parents=True, exist_ok=True)

    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    if "first_step" in args.parts:
        results["first_step"] = first_step(args)
        print(json.dumps(results["first_step"], indent=2), flush=True)
        torch.cuda.empty_cache()
    if "losses" in args.parts:
        bf16 = losses(args, "recipes/mistral-7b-lora.yaml", "bf16")
        fp8 = losses(args, "recipes/mistral-7b-lora-fp8.yaml", "fp8")
        diffs = [abs(b - a) / a for a, b in zip(bf16, fp8)]
        results["losses"] = {"steps": len(diffs), "bf16": bf16, "fp8": fp8, "max_rel_diff": max(diffs),
                             "mean_rel_diff": sum(diffs) / len(diffs), "within_0.5%": max(diffs) <= 0.005}
        print(f"{len(diffs)} steps: loss bf16 {bf16[0]:.4f} -> {bf16[-1]:.4f}, fp8 {fp8[0]:.4f} -> {fp8[-1]:.4f}; "
              f"per-step relative difference max {max(diffs):.4%}, mean {sum(diffs) / len(diffs):.4%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
