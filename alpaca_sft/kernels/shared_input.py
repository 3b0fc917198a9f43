"""Layers that read one input one after another, and the one cache where what a layer computed from that input
waits for the next.

In Llama-family decoders (Mistral's, Qwen2's, Gemma 3's) q, k and v are called in that order on the normed hidden
states, and gate and up on the MLP's input. kernels/fused_lora.py runs such a group's LoRA GEMMs at once, its first
layer leaving the others their outputs here; kernels/fp8_base.py quantizes the input once for the group's FP8 layers,
leaving the quantized input here. Both key what they leave on the input tensor itself (alive and unchanged), so a
model that calls its layers in another order only computes more often, never wrongly."""

from __future__ import annotations

import weakref

import torch

SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def read_after(name: str) -> tuple[str, ...]:
    """The full names of the layers that read the input of layer `name` after it (model.layers.0.self_attn.q_proj:
    its k_proj and v_proj); none for a layer of no group."""
    parent, _, own = name.rpartition(".")
    later = next((group[group.index(own) + 1:] for group in SHARED_INPUT_GROUPS if own in group), ())
    return tuple(f"{parent}.{sibling}" if parent else sibling for sibling in later)


class InputCache:
    """Values computed from one input tensor, each left for the reader (a key) that reads that tensor next. A reader
    takes its value once; leaving a value for another input, or for this one changed in place since, drops every value
    left before, whose readers then compute their own. So nothing left here outlives the input its readers read, and
    once a forward has called every reader (when memory peaks, at its end) nothing is held."""

    def __init__(self):
        self._source, self._version, self._left = None, None, {}

    def _for(self, x: torch.Tensor) -> bool:
        return self._source is not None and self._source() is x and self._version == x._version

    def leave(self, x: torch.Tensor, reader, value) -> None:
        if not self._for(x):
            self._source, self._version, self._left = weakref.ref(x), x._version, {}
        self._left[reader] = value

    def take(self, x: torch.Tensor, reader):
        """The value left for `reader` if it was computed from `x` as it is now, else None; gone either way."""
        value = self._left.pop(reader, None)
        return value if self._for(x) else None

    def __len__(self) -> int:
        return len(self._left)


# The one cache, shared by fused_lora's groups and fp8_base's quantized inputs: a model's layers run one at a time.
input_cache = InputCache()
