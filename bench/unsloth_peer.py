"""Unsloth as a speed peer: its own fastest LoRA path (unsloth 2026.10.9: FastLanguageModel, its Triton
kernels, its patched TRL SFTTrainer) on the same model, data and LoRA as bench/trl_peers.py's tuned peer;
writes the same run_summary-like JSON for bench/speed.py.

Same workload as trl_peers.py: each Alpaca record's render_prompt() as the prompt and its output as the
completion (completion-only loss, EOS appended), LoRA r=16, alpha=32, dropout 0 on q,k,v,o,gate,up,down_proj,
a bf16 base (load_in_4bit=False: bf16 LoRA is what is compared), packing (padding-free, TRL's best-fit
decreasing) to 2048-token rows, --rows_per_step rows per step, fused AdamW (transformers' default, which the TRL
peers get). Unsloth's SFTConfig defaults that would change the workload (optim adamw_8bit, gradient accumulation
2) are overridden; its loss_type "nll" (its own fused cross-entropy, not TRL's chunked_nll) is kept, and said.

Its packages are not the project's (unsloth pins trl<=1.15.0, datasets<5): bench/unsloth_inputs.sh carries
them to /tmp/unsloth-site, which goes alone on PYTHONPATH with the checkout (for alpaca_sft):

    PYTHONPATH=/tmp/unsloth-site:$PWD python3 bench/unsloth_peer.py --model /tmp/smoke/mistral-7b \
        --data /tmp/smoke/alpaca.jsonl --steps 90 --rows 2000 --out unsloth.json
"""

import os

# Read by unsloth/unsloth_zoo at import, so set before it. setdefault: a caller's own value wins.
# HF_HUB_OFFLINE: zoo then sets TRANSFORMERS_OFFLINE/HF_DATASETS_OFFLINE too and keeps hf_transfer off,
# models/_utils.has_internet() answers False without probing 8.8.8.8, and from_pretrained's
# @_offline_aware_load forces local_files_only. UNSLOTH_DISABLE_STATISTICS: get_statistics() would
# snapshot_download unslothai/* READMEs (skipped offline too; belt and braces).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
# Where unsloth_zoo writes the trainer and modules it generates (default ./unsloth_compiled_cache, i.e. the checkout).
os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", "/tmp/unsloth-compiled-cache")

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the alpaca_sft package, when run from a checkout

import unsloth  # noqa: I001 -- before transformers, trl and peft, which it patches on import
from unsloth import FastLanguageModel

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer  # Unsloth's patched classes once unsloth is imported

from alpaca_sft.data.template import render_prompt
from harness import add_model_and_data, argument_parser, write_results

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # trl_peers' "all-linear"
CHECKPOINTING = {"false": False, "unsloth": "unsloth", "true": True}  # "unsloth": its offloaded checkpointing


class Throughput(TrainerCallback):
    """Tokens/s between the last two logs, as trl_peers.py's: the steady state, compile and warm-up excluded.
    Unsloth drops TRL's num_tokens from the logs (unsloth_zoo/logging_utils.py REMOVED_METRICS), so the
    tokens are counted here, at each forward, as TRL counts them: every token of the packed rows."""

    def __init__(self):
        self.points, self.tokens = [], 0

    def count(self, module, args, kwargs):
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
        if torch.is_grad_enabled():  # training forwards only
            self.tokens += int(mask.sum()) if mask is not None else (ids.numel() if ids is not None else 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.points.append((time.perf_counter(), float(self.tokens), logs.get("loss")))


def main():
    parser = argument_parser(__doc__)
    add_model_and_data(parser)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, help="the first ROWS records only (TRL tokenizes every row before step 1)")
    parser.add_argument("--rows_per_step", type=int, default=4, help="packed 2048-token rows per optimizer step")
    parser.add_argument("--checkpointing", choices=list(CHECKPOINTING), default="false",
                        help="false: fastest, fits 80 GB at 4 rows; unsloth: Unsloth's default (offloaded); true: HF's")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.time()  # wall time from here, as train_sft.py counts it: loading and set-up included
    checkpointing = CHECKPOINTING[args.checkpointing]

    records = [json.loads(line) for line in Path(args.data).read_text().splitlines()[: args.rows]]
    dataset = Dataset.from_list(
        [{"prompt": render_prompt(r["instruction"], r.get("input", "")), "completion": r["output"]} for r in records]
    )
    gpu = torch.cuda.is_available()
    # use_exact_model_name: no mapping of the name to an unsloth/* Hub repo; local_files_only: no Hub call at all.
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.model, max_seq_length=2048, dtype=torch.bfloat16 if gpu else torch.float32,
        load_in_4bit=False, use_exact_model_name=True, local_files_only=True, trust_remote_code=False,
        use_gradient_checkpointing=checkpointing)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0, target_modules=TARGETS, bias="none",
        use_gradient_checkpointing=checkpointing, random_state=3407,
        temporary_location="/tmp/unsloth-saved-buffers")  # only for offloaded embeddings; default is in the CWD
    # gradient_checkpointing=False said in the config, or TRL's default (True) re-enables HF's checkpointing;
    # for "unsloth"/true the config is left at TRL's default, as Unsloth's own notebooks leave it.
    gc = {"gradient_checkpointing": False} if checkpointing is False else {}
    config = SFTConfig(output_dir=str(args.out.with_suffix("")), max_steps=args.steps, logging_steps=max(1, args.steps // 6),
                       save_strategy="no", report_to="none", bf16=gpu, use_cpu=not gpu, packing=True, max_length=2048,
                       per_device_train_batch_size=args.rows_per_step, gradient_accumulation_steps=1,
                       optim="adamw_torch_fused" if gpu else "adamw_torch", loss_type="nll", **gc)
    # What was asked, read before Unsloth's trainer edits the config (padding-free clears max_length there).
    asked = {"per_device_train_batch_size": config.per_device_train_batch_size, "max_length": config.max_length}
    meter = Throughput()
    # No data_collator: a custom one makes Unsloth turn packing off (trainer.py, _patch_sft_trainer_auto_packing).
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[meter])
    model.register_forward_pre_hook(meter.count, with_kwargs=True)
    trainer.train()
    (t0, n0, _), (t1, n1, last_loss) = meter.points[-2], meter.points[-1]
    attention = sys.modules.get("unsloth.utils.attention_dispatch")  # what Unsloth's attention ran on (GPU path)
    backend = ("cpu backend" if attention is None else "flash_attn" if attention.HAS_FLASH_ATTENTION
               else "xformers" if attention.HAS_XFORMERS else "torch varlen" if attention._TORCH_VARLEN_ATTN is not None
               else "sdpa per packed segment")
    summary = {
        "status": "completed", "global_step": trainer.state.global_step, "first_loss": meter.points[0][2],
        "last_loss": last_loss, "tokens_per_second": {"last_logged": (n1 - n0) / (t1 - t0), "mean_over_run": None},
        "tokens_seen": n1, "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        "attn_implementation": f"unsloth: {backend} (config: {getattr(model.config, '_attn_implementation', None)})",
        "wall_time_s": time.time() - started, "gradient_checkpointing": checkpointing,
        "settings": {**asked, "packing": trainer.args.packing,  # as the trainer ran: Unsloth can turn packing off
                     "padding_free": getattr(trainer.args, "padding_free", None),
                     "optim": getattr(trainer.args.optim, "value", trainer.args.optim)},
        "unsloth_version": unsloth.__version__,
    }
    write_results(args.out, summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
