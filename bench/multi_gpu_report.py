"""Tables of the multi-GPU runs of bench/sessions/2026-11-25-multi-gpu.sh: throughput in all and per GPU, scaling against
one GPU of the same machine, peak memory of every GPU, losses against the matching run, resume and merge.

    python bench/multi_gpu_report.py /tmp/out/multi_gpu --gpus 2

Each run folder holds the run_summary.json and trainer_state.json that train_sft.py wrote, and wall_s.
"""

import argparse
import json
from pathlib import Path

EPOCH_TOKENS = 7_495_785  # every token of the full synthetic workload, as the pipeline counts them (bench/RESULTS.md)


def load(folder: Path) -> dict | None:
    if not (folder / "run_summary.json").is_file():
        return None
    run = json.loads((folder / "run_summary.json").read_text())
    state = folder / "trainer_state.json"
    history = json.loads(state.read_text())["log_history"] if state.is_file() else []
    run["losses"] = {h["step"]: h["loss"] for h in history if "loss" in h}
    run["wall_s"] = float((folder / "wall_s").read_text()) if (folder / "wall_s").is_file() else None
    return run


def loss_gap(run: dict, reference: dict, from_step: int = 0) -> str:
    """Largest relative difference between the two runs' losses at the steps both logged."""
    steps = sorted(s for s in run["losses"] if s in reference["losses"] and s > from_step)
    if not steps:
        return "n/a"
    gap = max(abs(run["losses"][s] - reference["losses"][s]) / abs(reference["losses"][s]) for s in steps)
    return f"{gap:.1e} (steps {steps[0]}-{steps[-1]})"


def rate(run: dict) -> float | None:
    return (run.get("tokens_per_second") or {}).get("steady")


def peaks(run: dict) -> str:
    return " / ".join(f"{p:.1f}" for p in run.get("peak_gpu_memory_gib_per_process") or []) or "n/a"


def throughput_row(name: str, run: dict | None, one_gpu: dict | None, epoch_tokens: int) -> str:
    if run is None:
        return f"| {name} | not run | | | | | | |"
    if run["status"] != "completed":
        return f"| {name} | {run['status'][:80]} | | | | | | |"
    total, processes = rate(run), run["world_size"]
    per_gpu = total / processes
    scaling = f"{per_gpu / rate(one_gpu):.0%}" if one_gpu and rate(one_gpu) and run is not one_gpu else "-"
    losses = loss_gap(run, one_gpu) if one_gpu and run is not one_gpu else "-"
    return (f"| {name} | {processes} | {total:,.0f} | {per_gpu:,.0f} | {scaling} | {peaks(run)} | "
            f"{epoch_tokens / total / 60:.1f} | {losses} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--gpus", type=int, default=2)
    args = parser.parse_args()
    runs = {p.name: load(p) for p in sorted(args.folder.iterdir()) if p.is_dir()}
    epoch = runs.get("lora-ddp-epoch")
    epoch_tokens = epoch["data"]["total_tokens"] if epoch else EPOCH_TOKENS

    lines = ["| run | processes | tokens/s | tokens/s per GPU | per GPU vs 1 GPU | peak GiB per GPU | min/epoch | "
             "loss vs 1 GPU (max rel. diff) |", "|---|---:|---:|---:|---:|---|---:|---|"]
    for recipe in ("lora", "lora-fp8", "qlora"):
        one = runs.get(f"{recipe}-1gpu")
        if one is None and recipe == "lora-fp8":
            continue
        lines.append(throughput_row(f"{recipe}, 1 GPU", one, one, epoch_tokens))
        lines.append(throughput_row(f"{recipe}, DDP", runs.get(f"{recipe}-ddp"), one, epoch_tokens))
        for fsdp in {"lora": ("fsdp-lora",), "qlora": ("fsdp-qlora", "fsdp1-qlora")}.get(recipe, ()):
            if fsdp in runs or fsdp != "fsdp1-qlora":
                lines.append(throughput_row(f"{recipe}, {fsdp.split('-')[0].upper()}", runs.get(fsdp), one, epoch_tokens))
    checkpointed = [(f"lora, {kind}, gradient checkpointing", runs.get(f"lora-{kind.lower()}-ckpt")) for kind in ("DDP", "FSDP")]
    lines += [throughput_row(name, run, runs.get("lora-1gpu"), epoch_tokens) for name, run in checkpointed if run is not None]
    print("\n".join(lines) + "\n")

    lines = ["| run | adapter after the run | resumed at step 6: loss vs uninterrupted | merge: max logit diff | "
             "4-bit or FP8 + adapter vs merged |", "|---|---|---|---|---|"]
    for name in ("fsdp-lora", "fsdp-qlora", "fsdp1-qlora", "lora-fp8-ddp"):
        run, resumed = runs.get(name), runs.get(f"{name}-resumed")
        if run is None:
            continue
        files = args.folder / name / "files.txt"
        adapter = "adapter_model.safetensors" if files.is_file() and "adapter_model.safetensors" in files.read_text() else "none"
        resume = loss_gap(resumed, run, from_step=6) if resumed and resumed["status"] == "completed" else "n/a"
        comparison = args.folder / f"eval-{name}" / "comparison.json"
        report = json.loads(comparison.read_text()) if comparison.is_file() else {}
        # the tuned model's merge numbers: under "models" since eval_compare compares several, under "meta" before
        meta = next((m for model, m in report.get("models", {}).items() if model != "base"), report.get("meta", {}))
        qlora = meta.get("qlora_gap", meta.get("fp8_gap", {})).get("max_abs_logit_diff")
        lines.append(f"| {name} | {run['status']}, {adapter} | {resume} | {meta.get('merge_max_abs_logit_diff', 'n/a')} | "
                     f"{qlora if qlora is not None else '-'} |")
    print("\n".join(lines) + "\n")

    if epoch:
        print(f"full epoch, LoRA recipe, DDP on {epoch['world_size']} GPUs: {epoch['status']}, {epoch['global_step']} steps, "
              f"{epoch['tokens_seen']:,} tokens in {epoch['train_runtime_s']:.0f} s of training, {epoch['wall_s']:.0f} s wall "
              f"from launch to exit; {epoch['tokens_per_second']['mean_over_run']:,.0f} tokens/s over the run, "
              f"{rate(epoch):,.0f} steady; peak GiB per GPU {peaks(epoch)}; loss {epoch['first_loss']:.3f} -> "
              f"{epoch['last_loss']:.3f}")


if __name__ == "__main__":
    main()
