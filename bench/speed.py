"""The speed benchmark: the project's own training path (train_sft.py + the shipped recipes) in
several configurations, and TRL's defaults as the baseline, on the same model and workload, in
one run. Prints and writes a table: tokens/s, MFU, peak GiB, minutes per epoch.

    python -m alpaca_sft.random_model /tmp/smoke/mistral-7b --size 7b
    python bench/workload.py /tmp/smoke/alpaca.jsonl --model /tmp/smoke/mistral-7b
    python bench/speed.py --model /tmp/smoke/mistral-7b --data /tmp/smoke/alpaca.jsonl --steps 30 --out bench/results/speed.md

MFU counts the matmul FLOPs of LoRA on a frozen base: per token 2N forward + 2N for the input
gradients (+2N when checkpointing recomputes the forward), N = the model's linear-layer weights,
against a bf16 8192^3 matmul measured on the same GPU.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

CONFIGS = {  # name: (recipe, flags on top of it)
    "lora-recipe": ("recipes/mistral-7b-lora.yaml", []),
    "lora-liger-b4": ("recipes/mistral-7b-lora.yaml",
                      ["--use_liger_kernel", "true", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4"]),
    "qlora-recipe": ("recipes/mistral-7b-qlora.yaml", []),
    "qlora-liger": ("recipes/mistral-7b-qlora.yaml", ["--use_liger_kernel", "true"]),
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


def run_config(name, recipe, flags, args, work: Path) -> dict:
    cpu = [] if torch.cuda.is_available() else ["--bf16", "false", "--use_cpu", "true"]
    command = [sys.executable, "train_sft.py", "--config", recipe, "--model_name_or_path", args.model,
               "--dataset_name", args.data, "--output_dir", str(work / name), "--overwrite_output_dir", "true",
               "--max_steps", str(args.steps), "--logging_steps", str(max(1, args.steps // 6)), "--save_strategy", "no",
               *cpu, *flags]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"status": f"failed: {result.stderr.strip().splitlines()[-1][:120]}"}
    summary = json.loads((work / name / "run_summary.json").read_text())
    summary["gradient_checkpointing"] = yaml.safe_load((work / name / "train_config.yaml").read_text())["gradient_checkpointing"]
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/speed"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/speed.md"))
    args = parser.parse_args()

    tflops = matmul_tflops()
    weights = linear_weights(args.model)
    args.work.mkdir(parents=True, exist_ok=True)
    runs = {name: run_config(name, *CONFIGS[name], args, args.work) for name in args.configs}
    baseline_out = args.work / "trl-defaults.json"
    subprocess.run([sys.executable, "bench/trl_defaults.py", "--model", args.model, "--data", args.data,
                    "--steps", str(args.steps), "--out", str(baseline_out)], capture_output=True, text=True)
    runs["trl-defaults"] = json.loads(baseline_out.read_text()) if baseline_out.exists() else {"status": "failed"}

    tokens = next((r["data"]["total_tokens"] for r in runs.values() if "data" in r), None)
    base_rate = (runs["trl-defaults"].get("tokens_per_second") or {}).get("last_logged")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    lines = [f"{time.strftime('%Y-%m-%d')}, {device}, bf16 matmul {tflops or 0:.0f} TFLOP/s, {weights / 1e9:.2f} B linear "
             f"weights, {tokens or 0:,} tokens per epoch, {args.steps} steps per run",
             f"`python bench/speed.py --steps {args.steps} --configs {' '.join(args.configs)}`", "",
             "| run | tokens/s | x TRL defaults | MFU | peak GiB | min/epoch |", "|---|---:|---:|---:|---:|---:|"]
    for name, run in runs.items():
        rate = (run.get("tokens_per_second") or {}).get("last_logged")
        if not rate:
            lines.append(f"| {name} | {run.get('status')} | | | | |")
            continue
        flops = (6 if run.get("gradient_checkpointing") else 4) * weights * rate / 1e12
        mfu = f"{flops / tflops:.0%}" if tflops else "n/a"
        ratio = f"{rate / base_rate:.1f}x" if base_rate else "n/a"
        minutes = f"{tokens / rate / 60:.1f}" if tokens else "n/a"
        lines.append(f"| {name} | {rate:,.0f} | {ratio} | {mfu} | {run.get('peak_gpu_memory_gib') or 0:.1f} | {minutes} |")
    table = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
