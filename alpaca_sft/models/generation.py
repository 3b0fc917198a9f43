"""Greedy answers to many prompts, batched, each recording whether it stopped by EOS.

Used after training (train/validation.py's samples) and by eval_compare.py. Prompts are generated in
batches of similar length, longest first, and handed back in their own order: a batch runs until its
longest answer ends, so mixing a 40-token prompt with a 400-token one pads the short one for nothing,
and HF's generate stops a batch once every row has emitted EOS, which a tuned model does early.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Generation:
    text: str
    stop: str  # "eos" or "length"
    new_tokens: int
    seconds: float  # the batch's wall time, shared evenly by its prompts


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[Generation]:
    """Greedy answers, in the order of `prompts`. Batches are left-padded (a right-padded batch would
    generate after its pads); the tokenizer itself is left as it was."""
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    results: list[Generation | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        inputs = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, padding_side="left").to(device)
        began = time.perf_counter()
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                    pad_token_id=tokenizer.pad_token_id)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - began) / len(batch)
        for index, row in zip(batch, output[:, inputs["input_ids"].shape[1] :].tolist()):
            stopped = eos in row
            kept = row[: row.index(eos)] if stopped else row
            results[index] = Generation(tokenizer.decode(kept, skip_special_tokens=True), "eos" if stopped else "length",
                                        len(kept) + int(stopped), seconds)
    return results
