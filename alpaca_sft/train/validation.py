"""Watching the model learn to answer and stop, while it trains.

Each evaluation of the validation examples reports, beside the loss, a stop metric that needs no
generation: at the position where each validation response ends, whether the model's most likely
next token is EOS (`eos_top1`) and the probability it gives EOS there (`eos_prob`). The untuned base
rambles on past its answer, so both start near zero; a model that has learned to stop drives them
up. They come from the very forward pass that gives the loss: TRL's fused LM head already returns,
per supervised token, log p(label) and whether the label is the top-1 token, and where the label is
EOS those are the stop metric.

At the end of training, greedy answers to a few validation prompts say the same by generation.
"""

from __future__ import annotations

import functools
import time

import torch
import trl
from trl import SFTTrainer

from ..data.tokenize import IGNORE_INDEX
from ..launch import fsdp_enabled
from ..models.generation import generate

# TRL's fused LM head (trl.trainer.utils.add_fused_lm_head, public and documented) returns these
# per-token fields of its FusedCausalLMOutput; SFTTrainer asks it for is_top1. Their names changed
# within TRL 1.x before, so their absence is said in one line instead of an AttributeError mid-run.
FUSED_HEAD_FIELDS = ("label_mask", "log_probs", "is_top1")


class ResponseEndTally:
    """Sums over one evaluation: tokens and their negative log-likelihood, and at the response ends
    (labels equal to EOS) how many had EOS on top and their summed p(EOS)."""

    FIELDS = ("tokens", "nll", "ends", "eos_top1", "eos_prob")

    def __init__(self, eos_token_id: int):
        self.eos_token_id = eos_token_id
        self.reset()

    def reset(self) -> None:
        self.sums = None

    def add(self, outputs, labels: torch.Tensor) -> None:
        missing = [f for f in FUSED_HEAD_FIELDS if getattr(outputs, f, None) is None]
        if missing:
            raise RuntimeError(
                f"the stop metric reads {', '.join(FUSED_HEAD_FIELDS)} from TRL's fused LM head, and TRL {trl.__version__} "
                f"returns no {', '.join(missing)}: install the TRL this was built on (pip install 'trl==1.16.*'), "
                "or set eval_strategy: 'no'")
        ends = labels[:, 1:] == self.eos_token_id  # the fused head scores labels shifted by one
        values = torch.stack([
            outputs.label_mask.sum(), -outputs.log_probs.sum(),
            ends.sum(), outputs.is_top1[ends].sum(), outputs.log_probs[ends].exp().sum(),
        ]).double()
        self.sums = values if self.sums is None else self.sums + values

    def metrics(self, accelerator) -> dict[str, float]:
        """Token-weighted loss over every validation token, and the stop metric, across processes."""
        if self.sums is None:
            return {}
        tokens, nll, ends, top1, prob = accelerator.reduce(self.sums, reduction="sum").tolist()
        return {"loss": nll / max(tokens, 1), "eos_top1": top1 / max(ends, 1), "eos_prob": prob / max(ends, 1),
                "response_ends": ends}


class ValidatingSFTTrainer(SFTTrainer):
    """SFTTrainer whose evaluation reports the token-weighted validation loss and the stop metric.

    The Trainer averages per-batch mean losses weighted by rows, so packed rows (many examples each)
    and unpacked ones weigh the same tokens differently; the loss here is the mean over every
    supervised validation token, the same packed or not, and is what `eval_loss` reports.
    Under several processes accelerate may repeat a few examples to even out the last batch; they
    are counted as often as they are seen (a few among hundreds)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.response_ends = ResponseEndTally(self.processing_class.eos_token_id)
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        fused_forward = model.forward  # TRL's fused LM head, patched on this instance

        @functools.wraps(fused_forward)  # generate() checks its kwargs against this signature
        def forward(*args, **kwargs):
            outputs = fused_forward(*args, **kwargs)
            if kwargs.get("fused_lm_head") and not model.training and kwargs.get("labels") is not None \
                    and kwargs.get("shift_labels") is None:
                self.response_ends.add(outputs, kwargs["labels"])
            return outputs

        model.forward = forward

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        self.response_ends.reset()
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self.response_ends.metrics(self.accelerator).items()})
        return output


def validation_prompts(dataset, count: int, tokenizer) -> list[tuple[str, str]]:
    """(prompt, reference response) of the first `count` validation examples, as text."""
    pairs = []
    for row in dataset.select(range(min(count, len(dataset)))):
        start = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
        reference = [t for t in row["input_ids"][start:] if t != tokenizer.eos_token_id]
        pairs.append((tokenizer.decode(row["input_ids"][:start], skip_special_tokens=True),
                      tokenizer.decode(reference, skip_special_tokens=True)))
    return pairs


def samples_at_end(trainer, dataset, count: int, max_new_tokens: int) -> dict | None:
    """Greedy answers of the trained model to `count` validation prompts, on the main process; None
    under FSDP, where each process holds a slice of every weight (eval_compare.py does it there)."""
    if fsdp_enabled() or not trainer.accelerator.is_main_process:
        return None
    tokenizer = trainer.processing_class
    model = trainer.accelerator.unwrap_model(trainer.model)
    pairs = validation_prompts(dataset, count, tokenizer)
    was_training, use_cache = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = True  # training turned the KV cache off; generation wants it
    began = time.perf_counter()
    try:
        generations = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size=len(pairs))
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
    stopped = sum(g.stop == "eos" for g in generations)
    return {
        "stopped_by_eos": stopped, "prompts": len(generations), "max_new_tokens": max_new_tokens,
        "seconds": time.perf_counter() - began,
        "mean_new_tokens": sum(g.new_tokens for g in generations) / len(generations),
        "answers": [{"prompt": p, "reference": r, "answer": g.text, "stop": g.stop, "new_tokens": g.new_tokens}
                    for (p, r), g in zip(pairs, generations)],
    }


def samples_text(samples: dict, width: int = 100) -> str:
    lines = [f"greedy answers to {samples['prompts']} validation prompts: {samples['stopped_by_eos']} stopped by EOS, "
             f"{samples['mean_new_tokens']:.1f} new tokens on average (at most {samples['max_new_tokens']})"]
    for answer in samples["answers"]:
        text = " ".join(answer["answer"].split())
        lines.append(f"  [{'EOS' if answer['stop'] == 'eos' else 'cut at the limit'}, {answer['new_tokens']} tokens] "
                     f"{text[:width]}{'...' if len(text) > width else ''}")
    return "\n".join(lines)
