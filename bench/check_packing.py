"""On the GPU: the per-token loss of a packed row equals that of its examples run one by one,
through the attention training actually uses (attn_implementation "auto": FlashAttention-4 when installed on
Hopper or newer, else flash-attn 2's varlen kernel when installed, else document_flex, a compiled flex_attention
with a document mask), in bf16 and in fp32.

    python bench/check_packing.py

Random Mistral-7B-width layers (4 of them) and 24 examples of Alpaca-like lengths packed into one
row. A leaky baseline (plain causal attention over the same row) shows the size of the error the
document mask prevents.
"""

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tools")]

import torch
from transformers import MistralConfig, MistralForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from alpaca_sft.kernels.attention import resolve_attention
from random_model import MISTRAL_7B  # tools/random_model.py


def per_token_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100, reduction="none")


def main():
    torch.manual_seed(0)
    attn = resolve_attention("auto", packing=True)
    lengths = torch.clamp(torch.distributions.LogNormal(torch.log(torch.tensor(120.0)), 0.6).sample((24,)), 20, 900)
    examples = []
    for n in lengths.int().tolist():
        ids = torch.randint(3, 32000, (n,)).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3 :]})
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    trained = batch["labels"][0][1:] != -100
    print(f"attention: {attn}; one row of {batch['input_ids'].shape[1]} tokens, {len(examples)} examples")
    print(f"{'dtype':8} {'max |packed - separate|':>24} {'mean':>10} {'leaky max':>10} {'leaky mean':>10}")
    for dtype in (torch.float32, torch.bfloat16):
        config = MistralConfig(**dict(MISTRAL_7B, num_hidden_layers=4))
        model = MistralForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype).cuda().train()
        model.config.use_cache = False
        packed = model(**batch)
        packed.loss.backward()  # the training path: forward and backward through the document mask
        packed_losses = per_token_loss(packed.logits[0], batch["labels"][0]).detach()
        with torch.no_grad():
            separate = []
            for e in examples:
                logits = model(input_ids=torch.tensor([e["input_ids"]], device="cuda")).logits[0]
                separate += [per_token_loss(logits, torch.tensor(e["labels"], device="cuda")), torch.zeros(1, device="cuda")]
            separate = torch.cat(separate)[:-1]
            model.config._attn_implementation = "sdpa"
            leaky = per_token_loss(model(input_ids=batch["input_ids"]).logits[0], batch["labels"][0])
        gap = (packed_losses - separate)[trained].abs()
        leak = (leaky - separate)[trained].abs()
        print(f"{str(dtype)[6:]:8} {gap.max():>24.2e} {gap.mean():>10.2e} {leak.max():>10.2e} {leak.mean():>10.2e}")
        del model


if __name__ == "__main__":
    main()
