"""What a user would reach for instead of this project, on the same model and Alpaca-format data, with
PEFT LoRA r=16 on all linear layers; writes a run_summary-like JSON for bench/speed.py.

- `--peer defaults`: TRL's SFTTrainer with its default SFTConfig (batch 8, no packing, max_length
  1024, gradient checkpointing).
- `--peer tuned`: the best a competent TRL user gets without this project: packing (best-fit
  decreasing, padding-free) to 2048-token rows, transformers' own flex_attention (correct for packed
  rows, ../shared/CONTEXT.md §1), Liger's kernels, no checkpointing, 4 rows per step (6 run out of
  memory on an 80 GB card). `--attention flash_attention_4` gives it FlashAttention-4 where installed, with
  Liger's RoPE kept on its Triton kernel as this project's README tells any TRL user (Liger otherwise switches to
  a CuTe DSL kernel once FA4's nvidia-cutlass-dsl imports, and the step waits on the host).

    python bench/trl_peers.py --peer tuned --model /tmp/smoke/mistral-7b --data /tmp/smoke/alpaca.jsonl --steps 30 --out trl.json
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the alpaca_sft package, when run from a checkout

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from alpaca_sft.data.template import render_prompt
from harness import add_model_and_data, argument_parser, write_results


class Throughput(TrainerCallback):
    """Tokens/s between the last two logs: the steady state, compile and warm-up excluded."""

    def __init__(self):
        self.points = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "num_tokens" in logs:
            self.points.append((time.perf_counter(), float(logs["num_tokens"]), logs.get("loss")))


def main():
    parser = argument_parser(__doc__)
    add_model_and_data(parser)
    parser.add_argument("--peer", choices=("defaults", "tuned"), default="defaults")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, help="the first ROWS records only (TRL tokenizes every row before step 1)")
    parser.add_argument("--attention", default="flex_attention", help="the tuned peer's attn_implementation")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.time()  # wall time from here, as train_sft.py counts it: loading and set-up included

    records = [json.loads(line) for line in Path(args.data).read_text().splitlines()[: args.rows]]
    dataset = Dataset.from_list(
        [{"prompt": render_prompt(r["instruction"], r.get("input", "")), "completion": r["output"]} for r in records]
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    gpu = torch.cuda.is_available()
    tuned = args.peer == "tuned"
    if tuned and args.attention == "flash_attention_4":
        os.environ.setdefault("LIGER_KERNEL_IMPL_ROPE", "nvidia-triton")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if gpu else torch.float32,
                                                 attn_implementation=args.attention if tuned else None, trust_remote_code=False)
    peer = dict(packing=True, max_length=2048, per_device_train_batch_size=4, gradient_checkpointing=False,
                use_liger_kernel=gpu) if tuned else {}  # defaults: nothing set
    config = SFTConfig(output_dir=str(args.out.with_suffix("")), max_steps=args.steps, logging_steps=max(1, args.steps // 6),
                       save_strategy="no", report_to="none", bf16=gpu, use_cpu=not gpu, **peer)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    meter = Throughput()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=[meter])
    trainer.train()
    (t0, n0, _), (t1, n1, last_loss) = meter.points[-2], meter.points[-1]
    summary = {
        "status": "completed", "global_step": trainer.state.global_step, "first_loss": meter.points[0][2],
        "last_loss": last_loss, "tokens_per_second": {"last_logged": (n1 - n0) / (t1 - t0), "mean_over_run": None},
        "tokens_seen": n1, "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        "attn_implementation": model.config._attn_implementation, "wall_time_s": time.time() - started,
        "gradient_checkpointing": config.gradient_checkpointing,
        "settings": {"per_device_train_batch_size": config.per_device_train_batch_size,
                     "max_length": config.max_length, "packing": config.packing},
    }
    write_results(args.out, summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
