"""Batched greedy generation, recording for each answer whether it stopped by EOS."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .prompts import EvalPrompt


@dataclass
class Generation:
    text: str
    stop: str  # "eos" or "length"
    new_tokens: int
    seconds: float  # the batch's wall time, shared evenly by its prompts
    exact_match: bool | None = None
    sql: dict | None = field(default=None)


def generate(model, tokenizer, prompts: list[EvalPrompt], max_new_tokens: int, batch_size: int) -> list[Generation]:
    """Greedy, batched, left-padded (a right-padded batch would generate after its pads)."""
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        inputs = tokenizer([p.prompt for p in batch], return_tensors="pt", padding=True).to(device)
        began = time.perf_counter()
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - began) / len(batch)
        for row in output[:, inputs["input_ids"].shape[1] :].tolist():
            stopped = eos in row
            kept = row[: row.index(eos)] if stopped else row
            results.append(
                Generation(tokenizer.decode(kept, skip_special_tokens=True), "eos" if stopped else "length",
                           len(kept) + int(stopped), seconds)
            )
    return results
