"""grouped_sdpa: transformers' sdpa, with a one-token query reading each key/value head of the cache once.

Given a mask, which a batch of left-padded rows always needs, transformers' sdpa copies each key/value head once
for every query head that shares it (repeat_kv) before calling torch's scaled_dot_product_attention: with 4 query
heads per key/value head (Mistral-7B, Gemma-3-270m) a decoding step copies its whole KV cache four times over and
reads the copy. For a one-token query, the query heads that share a key/value head can instead be that head's query
rows: the same attention, the cache read as it is. Prefill (many query tokens), batches without a mask and models
without grouped heads go to sdpa unchanged. models/generation.py swaps it in for sdpa while it generates.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

GROUPED_SDPA = "grouped_sdpa"


def grouped_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs):
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or attention_mask is None or groups == 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, width = query.shape
    # repeat_kv gives query head h the key/value head h // groups: the same heads, as rows of one query
    rows = query.reshape(batch, heads // groups, groups, width)
    output = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask,
                                                              dropout_p=dropout, scale=scaling)
    return output.reshape(batch, 1, heads, width), None  # (batch, query length, heads, width), as sdpa returns it


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


@contextmanager
def grouped_decoding(model):
    """The model runs grouped_sdpa instead of sdpa inside the block; any other attention is left as it is, and so
    is a model that does not take its attention from transformers' AttentionInterface."""
    if model.config._attn_implementation != "sdpa" or not getattr(model, "_supports_attention_backend", False):
        yield
        return
    model.set_attn_implementation(GROUPED_SDPA)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")
