"""Where a training micro-batch's GPU time goes, and what single levers change it, in one process.

    python bench/step_breakdown.py --model /tmp/smoke/mistral-7b --data /tmp/smoke/alpaca.jsonl \
        --config recipes/mistral-7b-lora.yaml --out bench/results/breakdown.json

The trainer is the one train_sft.py builds from the recipe: its run prepared as train_sft.py prepares it
(alpaca_sft/train/prepare.py: settings checked, the pipeline's defaults filled in), then alpaca_sft.train.run's
build_trainer (loader, PEFT adapters, Liger kernels, TRL's fused LM head, BFD-packed rows and TRL's padding-free
collator). Each variant then times forward + backward of the same packed micro-batches through the trainer's own
compute_loss under the trainer's accelerator (bf16 autocast), with no optimizer step, changing one lever from the
recipe:

  recipe          as shipped: LoRA weights fp32, the adapted layers' inputs left in bf16
  peft-upcast     PEFT's default: every adapted layer's input is first copied to fp32
  rows-4          4 packed rows per micro-batch
  checkpointing   gradient checkpointing on: activations recomputed in backward
  bf16-adapters   LoRA weights stored in bf16
  no-adapters     the frozen base alone, input gradients still computed: the floor under LoRA
  unshared        fused LoRA with every layer alone: q/k/v and gate/up not run as groups that share their input
  fast-input-grad (an FP8 recipe) fast accumulation in the input-gradient FP8 GEMM too, not only the forward's

The headline speeds come from bench/speed.py (whole training runs); this script explains them.
On a GPU it then profiles one recipe micro-batch and splits its GPU time into base-weight GEMMs
(with their achieved TFLOP/s), LoRA GEMMs and the largest remaining kernels.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the alpaca_sft package, when run from a checkout

import torch
from peft.helpers import disable_input_dtype_casting

from alpaca_sft.kernels import fp8_base
from alpaca_sft.kernels.fused_lora import fuse_lora
from alpaca_sft.train.run import build_trainer as build_training_trainer
from harness import add_model_and_data, argument_parser, device_name, prepared_run, write_results
from speed import linear_weights, matmul_tflops  # bench/speed.py, beside this script

VARIANTS = ("recipe", "peft-upcast", "rows-4", "checkpointing", "bf16-adapters", "no-adapters", "unshared", "fast-input-grad")
GPU = torch.cuda.is_available()


def recipe_trainer(args, *flags: str):
    """The trainer train_sft.py builds from the recipe (args.config, .model, .data, .work, .rows), without
    validation, with train_sft.py's `flags` on top; bench/step_gaps.py trains it."""
    with prepared_run(args.config, "--model_name_or_path", args.model, "--dataset_name", args.data, "--output_dir",
                      args.work, "--max_train_rows", args.rows, "--report_to", "none", "--validation_size", "0",
                      *flags) as run:
        return build_training_trainer(*run.settings, run.tokenizer, run.dataset)


def build_trainer(args):
    """recipe_trainer's, with Liger's kernels applied as Trainer.train() applies them when it starts
    (this script times forward + backward of micro-batches and never calls train())."""
    trainer = recipe_trainer(args)
    training_args = trainer.args
    if training_args.use_liger_kernel:
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(trainer.model, training_args.liger_kernel_config)
    return trainer


def micro_batches(trainer, rows: int, count: int) -> list[dict]:
    """`count` micro-batches of `rows` packed rows each, collated as training collates them."""
    packed = trainer.train_dataset
    batches = []
    for k in range(count):
        examples = [packed[(k * rows + i) % len(packed)] for i in range(rows)]
        batch = trainer.data_collator(examples)
        batches.append({key: v.to(trainer.args.device) if torch.is_tensor(v) else v for key, v in batch.items()})
    return batches


@contextmanager
def lever(name: str, model, autocast: bool):
    """The model as the variant wants it, restored afterwards."""
    if name == "peft-upcast":
        yield
    elif name == "checkpointing":
        model.gradient_checkpointing_enable()  # non-reentrant, transformers 5's default
        model.enable_input_require_grads()
        with disable_input_dtype_casting(model, active=autocast):
            yield
        model.gradient_checkpointing_disable()
        model.disable_input_require_grads()
    elif name == "bf16-adapters":
        adapters = [p for n, p in model.named_parameters() if "lora_" in n]
        kept = [p.data for p in adapters]
        for p in adapters:
            p.data = p.data.to(torch.bfloat16)
        yield
        for p, data in zip(adapters, kept):
            p.data = data
    elif name == "no-adapters":
        model.enable_input_require_grads()  # nothing is trainable: backpropagate to the embeddings' output
        with model.disable_adapter():
            yield
        model.disable_input_require_grads()
    elif name == "fast-input-grad":
        kept, fp8_base.FAST_ACCUMULATION_INPUT_GRAD = fp8_base.FAST_ACCUMULATION_INPUT_GRAD, True
        with disable_input_dtype_casting(model, active=autocast):
            yield
        fp8_base.FAST_ACCUMULATION_INPUT_GRAD = kept
    elif name == "unshared":
        fuse_lora(model, share_inputs=False)
        with disable_input_dtype_casting(model, active=autocast):
            yield
        fuse_lora(model)
    else:  # recipe, rows-N: as train_sft.py trains
        with disable_input_dtype_casting(model, active=autocast):
            yield


def sync():
    if GPU:
        torch.cuda.synchronize()


def time_micro_batches(step, batches, warmup: int) -> tuple[float, int]:
    for batch in batches[:warmup]:
        step(batch)
    sync()
    started = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    sync()
    seconds = (time.perf_counter() - started) / len(batches[warmup:])
    tokens = sum(int(b["input_ids"].numel()) for b in batches[warmup:]) // len(batches[warmup:])  # padding-free: all real
    return seconds, tokens


def matmul_split(prof, lora_rank: int) -> dict:
    """GPU time of the GEMMs of the frozen weights (and their TFLOP/s) vs those of the LoRA factors,
    told apart by the rank in their shapes (a LoRA GEMM has one dimension of the rank, or of a group's ranks
    together); and the largest kernels of the step."""
    from torch.autograd import DeviceType

    # "## Call CompiledFxGraph ##" rows are annotations spanning a compiled graph's kernels, which are listed too.
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and not e.key.startswith("## ")]
    total_us = sum(e.self_device_time_total for e in kernels)
    base_us = lora_us = base_flops = 0.0
    first_factor = {"aten::mm": 0, "aten::addmm": 1, "aten::addmm_": 1}  # addmm(_)'s first input is the added matrix
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key not in first_factor:
            continue
        shapes = event.input_shapes
        (m, k), (_, n) = shapes[first_factor[event.key]], shapes[first_factor[event.key] + 1]
        if min(m, k, n) <= 3 * lora_rank:  # a LoRA factor, or up to three side by side (kernels/fused_lora.py's groups)
            lora_us += event.self_device_time_total
        else:
            base_us += event.self_device_time_total
            base_flops += 2.0 * m * k * n * event.count
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:15]
    return {
        "gpu_ms": total_us / 1e3,
        "base_gemm_ms": base_us / 1e3,
        "base_gemm_tflops": base_flops / (base_us * 1e-6) / 1e12 if base_us else None,
        "lora_gemm_ms": lora_us / 1e3,
        "other_ms": (total_us - base_us - lora_us) / 1e3,
        "top_kernels": [{"name": e.key[:110], "ms": e.self_device_time_total / 1e3, "calls": e.count} for e in top],
    }


def main():
    parser = argument_parser(__doc__)
    add_model_and_data(parser)
    parser.add_argument("--config", default="recipes/mistral-7b-lora.yaml")
    parser.add_argument("--rows", type=int, default=3000, help="records to tokenize and pack (enough for the batches)")
    parser.add_argument("--steps", type=int, default=4, help="timed micro-batches per variant, after 2 warm-up ones")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--tflops", type=float, help="the card's bf16 matmul rate for MFU; default: measured")
    parser.add_argument("--work", type=Path, default=Path("/tmp/step_breakdown"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/breakdown.json"))
    args = parser.parse_args()

    if args.tflops is None:
        args.tflops = matmul_tflops()
    trainer = build_trainer(args)
    model = trainer.accelerator.prepare_model(trainer.model)  # bf16 autocast around forward, as in training
    model.train()  # as Trainer.training_step does: checkpointing, for one, only acts in training mode

    def step(batch):
        loss = trainer.compute_loss(model, batch)
        trainer.accelerator.backward(loss)

    results = {"device": device_name(), "torch": torch.__version__, "config": args.config,
               "linear_weights": linear_weights(args.model), "variants": {}}
    print(f"{'variant':14} {'rows':>4} {'tokens':>7} {'ms':>8} {'tokens/s':>9} {'vs recipe':>9} {'MFU':>5} {'peak GiB':>8}")
    for name in args.variants:  # the results are rewritten after each: a cut-off call keeps what finished
        recipe_rate = results["variants"].get("recipe", {}).get("tokens_per_second")
        results["variants"][name] = time_variant(name, trainer, step, args, results["linear_weights"], recipe_rate)
        write_results(args.out, results)
    if GPU:
        results["profile_recipe"] = profile_recipe(trainer, step)
        write_results(args.out, results)
    print(f"wrote {args.out}")


def profile_recipe(trainer, step) -> dict:
    """One recipe micro-batch under the profiler: its GPU time split into base GEMMs, LoRA GEMMs and the rest."""
    batch = micro_batches(trainer, trainer.args.per_device_train_batch_size, 1)[0]
    with lever("recipe", trainer.model, autocast=trainer.args.bf16 or trainer.args.fp16):
        step(batch)  # warm
        sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                                    record_shapes=True) as prof:
            step(batch)
            sync()
    split = matmul_split(prof, trainer.model.peft_config["default"].r)
    print(f"\nrecipe micro-batch, {batch['input_ids'].numel()} tokens, GPU time {split['gpu_ms']:.1f} ms: "
          f"base GEMMs {split['base_gemm_ms']:.1f} ms ({split['base_gemm_tflops'] or 0:.0f} TFLOP/s), "
          f"LoRA GEMMs {split['lora_gemm_ms']:.1f} ms, everything else {split['other_ms']:.1f} ms")
    for kernel in split["top_kernels"]:
        print(f"  {kernel['ms']:8.2f} ms {kernel['calls']:5d}x  {kernel['name']}")
    return {"tokens": int(batch["input_ids"].numel()), **split}


def time_variant(name: str, trainer, step, args, weights: int, recipe_rate: float | None) -> dict:
    """One variant's forward + backward over the same micro-batches (a row of the table, printed beside the
    recipe's rate where it was measured first)."""
    rows = int(name.split("-")[1]) if name.startswith("rows-") else trainer.args.per_device_train_batch_size
    batches = micro_batches(trainer, rows, 2 + args.steps)
    trainer.model.zero_grad(set_to_none=True)
    if GPU:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with lever(name, trainer.model, autocast=trainer.args.bf16 or trainer.args.fp16):
            seconds, tokens = time_micro_batches(step, batches, warmup=2)
    except torch.OutOfMemoryError:
        print(f"{name:14} {rows:>4} out of memory", flush=True)
        return {"rows": rows, "status": "out of memory"}
    rate = tokens / seconds
    flops = (6 if name == "checkpointing" else 4) * weights * rate
    row = {"rows": rows, "tokens": tokens, "ms": seconds * 1e3, "tokens_per_second": rate,
           "mfu": flops / (args.tflops * 1e12) if args.tflops else None,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if GPU else None}
    ratio = f"{rate / recipe_rate:.2f}x" if recipe_rate else ("1.00x" if name == "recipe" else "")
    mfu = f"{row['mfu']:.0%}" if row["mfu"] else ""
    print(f"{name:14} {rows:>4} {tokens:>7} {row['ms']:>8.1f} {rate:>9,.0f} {ratio:>9} {mfu:>5} {row['peak_gib'] or 0:>8.1f}",
          flush=True)
    return row


if __name__ == "__main__":
    main()
