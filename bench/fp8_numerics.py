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

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the alpaca_sft package, when run from a checkout

import torch
from peft.helpers import disable_input_dtype_casting

from alpaca_sft.kernels import fp8_base
from alpaca_sft.kernels.fp8_base import Fp8FrozenLinear, quantize_frozen_base
from harness import add_model_and_data, argument_parser, device_name, prepared_run, write_results


def recipe_trainer(args, *flags: str):
    """train_sft.py's trainer of args.recipe on the first args.rows records, no validation, `flags` on top."""
    from alpaca_sft.train.run import build_trainer

    with prepared_run(args.recipe, "--model_name_or_path", args.model, "--dataset_name", args.data, "--output_dir",
                      "/tmp/fp8_numerics/first_step", "--report_to", "none", "--validation_size", "0",
                      "--drop_invalid_rows", "true", "--max_train_rows", args.rows, *flags) as run:
        return build_trainer(*run.settings, run.tokenizer, run.dataset)


def loss_and_grads(trainer, model, batch: dict, autocast: bool) -> tuple[float, dict]:
    """The batch's loss and every LoRA tensor's gradient (fp32, on the CPU), bf16 autocast or not."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(trainer.args.device.type, dtype=torch.bfloat16, enabled=autocast), disable_input_dtype_casting(model):
        loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}


def first_step(args) -> dict:
    """One packed row's loss and LoRA gradients with the base in fp32 (the reference), in bf16 (the
    recipe), then in FP8, all from the same weights: the FP8 base's distance from bf16 set beside
    bf16's own distance from fp32."""
    trainer = recipe_trainer(args, "--dtype", "float32")
    model = trainer.model
    model.train()
    if args.residual_branch_scale != 1:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("o_proj.base_layer.weight", "down_proj.base_layer.weight")):
                    p.mul_(args.residual_branch_scale)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    batch = {k: v.to(trainer.args.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    runs = {"fp32": loss_and_grads(trainer, model, batch, autocast=False)}
    for p in model.parameters():  # the base to bf16, as the recipe loads it; LoRA's weights stay fp32
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    runs["bf16"] = loss_and_grads(trainer, model, batch, autocast=True)
    converted = quantize_frozen_base(model)
    runs.update(fp8_runs(trainer, model, batch))
    if args.nf4:  # a 4-bit load of the same base, given the same LoRA weights: QLoRA's first step
        from peft import get_peft_model_state_dict

        lora = get_peft_model_state_dict(model)
        trainer = model = None  # the FP8 model's memory, before the 4-bit one loads
        runs["nf4"] = nf4_run(args, lora, batch)
    return {"tokens": int(batch["input_ids"].numel()), "layers_in_fp8": converted,
            "residual_branch_scale": args.residual_branch_scale, "lora_tensors": len(runs["fp32"][1]),
            **comparisons(runs, nf4=args.nf4)}


def fp8_runs(trainer, model, batch: dict) -> dict:
    """The FP8 base as it runs, its GEMMs without and with fast accumulation everywhere, and the bf16 math with the
    weights rounded to their e4m3 values: how much of FP8's distance from bf16 the weights' rounding alone makes,
    with no FP8 GEMM and no quantized activation or gradient (this last one leaves the model in bf16)."""
    runs = {"fp8": loss_and_grads(trainer, model, batch, autocast=True)}
    default = fp8_base.FAST_ACCUMULATION_FORWARD, fp8_base.FAST_ACCUMULATION_INPUT_GRAD
    for name, fast in (("fp8_precise", False), ("fp8_fast_accumulation_everywhere", True)):
        fp8_base.FAST_ACCUMULATION_FORWARD = fp8_base.FAST_ACCUMULATION_INPUT_GRAD = fast
        runs[name] = loss_and_grads(trainer, model, batch, autocast=True)
    fp8_base.FAST_ACCUMULATION_FORWARD, fp8_base.FAST_ACCUMULATION_INPUT_GRAD = default
    for layer in [m for m in model.modules() if isinstance(getattr(m, "base_layer", None), Fp8FrozenLinear)]:
        fp8_layer, rounded = layer.base_layer, torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
        rounded.weight = torch.nn.Parameter(fp8_layer.dequantized_weight().to(torch.bfloat16), requires_grad=False)
        layer.base_layer = rounded
    runs["bf16_e4m3_weights"] = loss_and_grads(trainer, model, batch, autocast=True)
    return runs


def nf4_run(args, lora: dict, batch: dict) -> tuple[float, dict]:
    from peft import set_peft_model_state_dict

    trainer = recipe_trainer(args, "--dtype", "bfloat16", "--load_in_4bit", "true")
    set_peft_model_state_dict(trainer.model, lora)
    trainer.model.train()
    return loss_and_grads(trainer, trainer.model, batch, autocast=True)


def comparisons(runs: dict, nf4: bool) -> dict:
    """Each run's loss, and its loss and gradients against the references'."""
    # PEFT starts B at zero, so on the first step every A's gradient is exactly zero: compared are the Bs
    names = [n for n, g in runs["fp32"][1].items() if g.abs().max() > 0]
    cosine = torch.nn.functional.cosine_similarity

    def compare(a: str, b: str) -> dict:
        (loss_a, grads_a), (loss_b, grads_b) = runs[a], runs[b]
        per_tensor = sorted(cosine(grads_a[n].flatten().double(), grads_b[n].flatten().double(), dim=0).item() for n in names)
        flat = [torch.cat([g[n].flatten() for n in names]).double() for g in (grads_a, grads_b)]
        return {"loss_rel_diff": abs(loss_b - loss_a) / loss_a, "grad_cosine_all": cosine(*flat, dim=0).item(),
                "grad_cosine_worst_tensor": per_tensor[0], "grad_cosine_median_tensor": per_tensor[len(per_tensor) // 2]}

    return {"compared_tensors": len(names), "loss": {name: run[0] for name, run in runs.items()},
            "bf16_vs_fp32": compare("fp32", "bf16"), "fp8_vs_fp32": compare("fp32", "fp8"), "fp8_vs_bf16": compare("bf16", "fp8"),
            "fp8_precise_vs_fp32": compare("fp32", "fp8_precise"),
            "fp8_fast_accumulation_everywhere_vs_fp32": compare("fp32", "fp8_fast_accumulation_everywhere"),
            "fp8_settings": {"fast_accumulation_forward": fp8_base.FAST_ACCUMULATION_FORWARD,
                             "fast_accumulation_input_grad": fp8_base.FAST_ACCUMULATION_INPUT_GRAD},
            "bf16_e4m3_weights_vs_bf16": compare("bf16", "bf16_e4m3_weights"),
            **({"nf4_vs_fp32": compare("fp32", "nf4"), "nf4_vs_bf16": compare("bf16", "nf4")} if nf4 else {})}


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
    parser = argument_parser(__doc__)
    add_model_and_data(parser)
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

    results = {"device": device_name(), "torch": torch.__version__}
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
    write_results(args.out, results)


if __name__ == "__main__":
    main()
