"""The speed benchmark: the project's own training path (train_sft.py + the shipped recipes) in
several configurations, and TRL's defaults as the baseline, on the same model and workload, in
one run. Prints and writes a table: tokens/s, MFU, peak GiB, minutes per epoch.

    python tools/random_model.py /tmp/smoke/mistral-7b --size 7b
    python bench/workload.py /tmp/smoke/alpaca.jsonl --model /tmp/smoke/mistral-7b
    python bench/speed.py --model /tmp/smoke/mistral-7b --data /tmp/smoke/alpaca.jsonl --rows 8000 --out bench/results/speed.md

MFU counts the matmul FLOPs of LoRA on a frozen base: per token 2N forward + 2N for the input
gradients (+2N when checkpointing recomputes the forward), N = the model's linear-layer weights,
against a bf16 8192^3 matmul measured on the same GPU.
"""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the alpaca_sft package, when run from a checkout

import torch
import yaml

from alpaca_sft.train.settings import cpu_overrides
from fp8_yardstick import FP8_VARIANTS, speed_config
from harness import add_model_and_data, argument_parser, device_name, write_results

CONFIGS = {  # name: (recipe, flags on top of it); "trl-*" are bench/trl_peers.py's peers. Run in this order.
    "lora-recipe": ("recipes/mistral-7b-lora.yaml", []),
    "lora-peft-forward": ("recipes/mistral-7b-lora.yaml", ["--fused_lora", "false"]),
    "lora-fp8-recipe": ("recipes/mistral-7b-lora-fp8.yaml", []),
    # the FP8 variants of bench/fp8_yardstick.py, which judges their closeness to bf16 on the real base
    **{speed_config(name): ("recipes/mistral-7b-lora-fp8.yaml", list(flags)) for name, flags in FP8_VARIANTS.items()
       if name != "fp8"},
    # transformers' default: the loss of every micro-batch tested for NaN/inf on the host (a device sync each)
    "lora-nan-filter": ("recipes/mistral-7b-lora.yaml", ["--logging_nan_inf_filter", "true"]),
    # validation's cost: none at all, and an evaluation every 5 steps (the recipe: every 50, and at start and end)
    "lora-no-validation": ("recipes/mistral-7b-lora.yaml", ["--validation_size", "0", "--eval_strategy", "no",
                                                            "--eval_on_start", "false", "--samples_at_end", "0"]),
    "lora-eval-every-5": ("recipes/mistral-7b-lora.yaml", ["--eval_steps", "5"]),
    # the same tokens per micro-batch in half as many rows of twice the length
    "lora-4096": ("recipes/mistral-7b-lora.yaml", ["--max_length", "4096", "--per_device_train_batch_size", "3"]),
    # the attention A/B: transformers' own kernels, each given TRL's packed position_ids
    "lora-transformers-flex": ("recipes/mistral-7b-lora.yaml", ["--attn_implementation", "flex_attention"]),
    "lora-sdpa": ("recipes/mistral-7b-lora.yaml", ["--attn_implementation", "sdpa"]),
    # FlashAttention-4 (flash-attn-4, CuTe DSL) through transformers' flash_attention_4, reading the packed
    # rows' boundaries ("auto" picks it where installed on Hopper); document_flex is "auto" without it.
    # bench/attention_kernels.py times each alone
    "lora-fa4": ("recipes/mistral-7b-lora.yaml", ["--attn_implementation", "flash_attention_4"]),
    "lora-document-flex": ("recipes/mistral-7b-lora.yaml", ["--attn_implementation", "document_flex"]),
    # the decoder layers compiled by Inductor (regional, dynamic shapes) instead of Liger's kernels
    "lora-compiled": ("recipes/mistral-7b-lora.yaml", ["--use_liger_kernel", "false", "--torch_compile", "true"]),
    "trl-defaults": ("defaults", []),
    "trl-tuned": ("tuned", []),
    # the tuned peer with FlashAttention-4 (installed: bench/speed_inputs.sh) and Liger's RoPE kept on Triton
    "trl-tuned-fa4": ("tuned", ["--attention", "flash_attention_4"]),
    # Unsloth's own LoRA path (bench/unsloth_peer.py), its packages alone on the path (bench/unsloth_inputs.sh)
    "unsloth": ("unsloth", []),
    "qlora-recipe": ("recipes/mistral-7b-qlora.yaml", []),
    "qlora-peft-forward": ("recipes/mistral-7b-qlora.yaml", ["--fused_lora", "false"]),
    "qlora-24gb-recipe": ("recipes/mistral-7b-qlora-24gb.yaml", []),
}


def matmul_tflops(size: int = 8192, repeats: int = 20) -> float | None:
    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * size**3 / sorted(times)[len(times) // 2] / 1e12


def linear_weights(model_dir: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    h, i, layers, v = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config.get("head_dim", h // config["num_attention_heads"])
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * v


UNSLOTH_SITE = "/tmp/unsloth-site"  # where bench/unsloth_inputs.sh's parts go on the GPU machine


def run_config(name, recipe, flags, args, work: Path) -> dict:
    peer = recipe in ("defaults", "tuned", "unsloth")
    env = None
    if peer:
        steps = args.baseline_steps if recipe == "defaults" else args.steps * 3  # 4 rows per step, not 18
        script = ["bench/unsloth_peer.py"] if recipe == "unsloth" else ["bench/trl_peers.py", "--peer", recipe]
        command = [sys.executable, *script, "--model", args.model, "--data", args.data,
                   "--steps", str(steps), "--rows", str(args.rows or 2000), "--out", str(work / f"{name}.json"), *flags]
        if recipe == "unsloth":  # its pins (trl<=1.15, datasets<5) are not the project's: its own packages alone
            env = {**os.environ, "PYTHONPATH": f"{UNSLOTH_SITE}:{Path.cwd()}"}
    else:
        cpu = cpu_overrides()
        rows = ["--max_train_rows", str(args.rows)] if args.rows else []
        command = [sys.executable, "train_sft.py", "--config", recipe, "--model_name_or_path", args.model,
                   "--dataset_name", args.data, "--output_dir", str(work / name), "--overwrite_output_dir", "true",
                   "--max_steps", str(args.steps), "--logging_steps", str(max(1, args.steps // 4)),
                   "--save_strategy", "no", *rows, *cpu, *flags]
    log = work / f"{name}.log"  # written as the run goes, so that a run cut off by the timeout keeps its log
    try:
        with log.open("w") as out:
            result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {args.timeout} s"}
    if result.returncode != 0:
        return {"status": f"failed: {log.read_text().strip().splitlines()[-1][:120]}"}
    if peer:
        return json.loads((work / f"{name}.json").read_text())
    summary = json.loads((work / name / "run_summary.json").read_text())
    summary["gradient_checkpointing"] = yaml.safe_load((work / name / "train_config.yaml").read_text())["gradient_checkpointing"]
    return summary


def epoch_tokens(model: str, data: str) -> int:
    """Every token of one epoch of the workload (template and EOS included), as training counts them."""
    from alpaca_sft.data.dataset import build_dataset
    from alpaca_sft.models.tokenizer import load_tokenizer

    return build_dataset(data, load_tokenizer(model), max_length=2048)[1].total_tokens


def card_peak_tflops(device: str) -> float | None:
    """The card's dense bf16 peak from its data sheet (no sparsity)."""
    if "H100" in device and "PCIe" in device:
        return 756.0
    return 989.4 if ("H100" in device or "H200" in device) else None


def table(runs: dict, args, tflops, weights: int, tokens: int) -> str:
    def rate_of(name):
        return (runs.get(name, {}).get("tokens_per_second") or {}).get("last_logged")

    defaults_rate, tuned_rate = rate_of("trl-defaults"), rate_of("trl-tuned")
    device = device_name()
    peak = card_peak_tflops(device)
    lines = [f"{time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, bf16 matmul measured {tflops or 0:.0f} "
             f"TFLOP/s (card peak {peak or 0:.0f}), {weights / 1e9:.2f} B linear weights, {tokens:,} tokens per epoch, "
             f"{args.steps} steps per run",
             f"`python bench/speed.py --steps {args.steps}{f' --rows {args.rows}' if args.rows else ''} "
             f"--baseline_steps {args.baseline_steps} --configs {' '.join(args.configs)}`", "",
             "| run | tokens/s | x TRL defaults | x TRL tuned | MFU (measured matmul) | MFU (card peak) | peak GiB | "
             "min/epoch | start-up s | min/epoch with start-up | evaluations: count, s | samples at end s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for name, run in runs.items():
        rate = rate_of(name)
        if not rate:
            lines.append(f"| {name} | {run.get('status')} | | | | | | | | | | |")
            continue
        flops = (6 if run.get("gradient_checkpointing") else 4) * weights * rate / 1e12

        def share(numerator, denominator, spec, unit=""):
            return format(numerator / denominator, spec) + unit if denominator else "n/a"

        minutes = tokens / rate / 60
        evaluations = (run.get("validation") or {}).get("evaluations") or []
        # Start-up: the run's wall time that its steady rate does not explain (loading, compiling, warm-up,
        # and the evaluations and greedy samples, shown apart in the last two columns).
        startup = run["wall_time_s"] - run["tokens_seen"] / rate
        lines.append(f"| {name} | {rate:,.0f} | {share(rate, defaults_rate, '.2f', 'x')} | {share(rate, tuned_rate, '.2f', 'x')} | "
                     f"{share(flops, tflops, '.0%')} | {share(flops, peak, '.0%')} | {run.get('peak_gpu_memory_gib') or 0:.1f} | "
                     f"{minutes:.1f} | {startup:.0f} | {minutes + startup / 60:.1f} | "
                     f"{len(evaluations)}, {sum(e.get('seconds') or 0 for e in evaluations):.1f} | "
                     f"{(run.get('samples_at_end') or {}).get('seconds', 0):.1f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argument_parser(__doc__)
    add_model_and_data(parser)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run; the last quarter is measured")
    parser.add_argument("--rows", type=int, help="train on the first ROWS records only (enough for --steps; faster start)")
    parser.add_argument("--baseline_steps", type=int, default=30, help="steps of trl-defaults (8 short examples each); trl-tuned runs 3x --steps")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--timeout", type=int, default=300, help="seconds per run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/speed"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/speed.md"))
    args = parser.parse_args()

    tflops = matmul_tflops()
    weights = linear_weights(args.model)
    # Counting the whole epoch's tokens takes a CPU for ~20 s: done beside the first GPU run.
    counting = ThreadPoolExecutor(1).submit(epoch_tokens, args.model, args.data)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name in args.configs:  # the table is rewritten after every run: a cut-off call keeps what finished
        started = time.time()
        runs[name] = run_config(name, *CONFIGS[name], args, args.work)
        write_results(args.out.parent / f"{name}.json", runs[name])
        args.out.write_text(table(runs, args, tflops, weights, counting.result()))
        print(f"{name}: {runs[name].get('status')} in {time.time() - started:.0f} s", flush=True)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
