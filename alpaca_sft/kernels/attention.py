"""document_flex: attention for packed rows, chosen for speed.

TRL's padding-free packing concatenates many examples into one row and passes their position_ids
(and the boundaries derived from them, `cu_seq_lens_q`). Every attention transformers offers keeps
the examples apart from that: for sdpa, eager and flex_attention transformers builds a per-example
mask from the position_ids itself (tests/test_attention.py checks each against one-by-one runs);
flash-attn's varlen kernel reads the boundaries. Only a packed row given without position_ids leaks.

"auto" picks FlashAttention-4 where it is installed and runs (resolve_attention, below). Without it,
this module registers "document_flex" with transformers' AttentionInterface: a compiled
`flex_attention` whose block mask is causal within each example, built once per batch from the
boundaries and shared by every layer. It is what "auto" picks without flash-attn, on a whole-run
measurement of the LoRA recipe on one H200 (bench/RESULTS.md): 15,751 tokens/s with 25 s of
start-up, against 15,836 with 225 s for transformers' own flex_attention (it recompiles as the
packed length changes) and 6,722 for sdpa with the dense per-example mask.
flex_attention has no CPU backward, so CPU training uses SDPA with the same mask made dense.
Batches that carry no boundaries (generation, unpacked training) go to SDPA unchanged.
"""

from __future__ import annotations

import warnings

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.utils import is_flash_attn_2_available, is_flash_attn_4_available

DOCUMENT_FLEX = "document_flex"

_compiled_flex = None
_mask_cache: tuple | None = None  # (cu_seq_lens tensor, (sliding_window, dense), mask)


def _uncompiled_flex(*args, **kwargs):
    # On a CPU (tiny models, tests, the quickstart's validation) flex runs uncompiled on purpose:
    # it materializes the scores, which is what a CPU can do anyway, and its warning says nothing
    # a user could act on.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def _flex():
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True) if torch.cuda.is_available() else _uncompiled_flex
    return _compiled_flex


@torch.compiler.disable  # under torch.compile a graph break: the cache lives outside the traced graph
def document_mask(cu_seq_lens: torch.Tensor, total_length: int, sliding_window: int | None, dense: bool):
    """Causal within each [cu[i], cu[i+1]) span, nothing across spans: a flex BlockMask, or a
    dense boolean [1, 1, T, T] mask. Made once per batch and reused by every layer (and by the
    gradient-checkpointing recomputation) of the same forward pass."""
    global _mask_cache
    key = (sliding_window, dense)
    if _mask_cache is not None and _mask_cache[0] is cu_seq_lens and _mask_cache[1] == key:
        return _mask_cache[2]
    device = cu_seq_lens.device
    positions = torch.arange(total_length, device=device)
    document = torch.searchsorted(cu_seq_lens[1:], positions, right=True)

    def causal_same_document(batch, head, q, kv):
        allowed = (document[q] == document[kv]) & (q >= kv)
        if sliding_window is not None:
            allowed = allowed & (q - kv < sliding_window)
        return allowed

    if dense:
        mask = causal_same_document(None, None, positions[:, None], positions[None, :])[None, None]
    else:
        mask = create_block_mask(causal_same_document, None, None, total_length, total_length, device=device)
    _mask_cache = (cu_seq_lens, key, mask)
    return mask


def document_flex_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    cu_seq_lens = cu_seq_lens.to(query.device)
    if not query.is_cuda and query.requires_grad:
        mask = document_mask(cu_seq_lens, query.shape[2], kwargs.get("sliding_window"), dense=True)
        return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    block_mask = document_mask(cu_seq_lens, query.shape[2], kwargs.get("sliding_window"), dense=False)
    output = _flex()(
        query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return output.transpose(1, 2).contiguous(), None


def _mask_unless_packed(*args, attention_mask=None, allow_is_causal_skip=True, **kwargs):
    # A packed batch carries no 2D mask, and transformers (masking_utils) forbids skipping the mask for it: its
    # structure is in cu_seq_lens, read by the attention itself, so building an O(tokens^2) dense mask here would
    # be wasted work. Any other batch gets SDPA's own mask, which is None for plain causal attention and a real
    # mask where a sliding window (Gemma, Mistral) limits it.
    if attention_mask is None and not allow_is_causal_skip:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, allow_is_causal_skip=allow_is_causal_skip, **kwargs)


AttentionInterface.register(DOCUMENT_FLEX, document_flex_attention)
AttentionMaskInterface.register(DOCUMENT_FLEX, _mask_unless_packed)


def resolve_attention(requested: str | None, packing: bool) -> str:
    """'auto' picks FlashAttention-4 (flash-attn-4) when installed on a Hopper or newer GPU, else
    flash-attn 2's varlen kernel when installed, else document_flex for packed rows and sdpa otherwise.
    Any other name is passed to transformers as it is.

    FlashAttention-4 reads the packed rows' boundaries like flash-attn 2 (transformers' own
    "flash_attention_4"): on one H100, 1.25x document_flex's forward + backward per layer and +7.0%
    tokens/s over a whole LoRA run, same loss (bench/RESULTS.md). It was measured on Hopper only and is
    built for Hopper and Blackwell; on older GPUs it is not chosen."""
    if requested not in (None, "auto"):
        return requested
    if torch.cuda.is_available():
        if torch.cuda.get_device_capability() >= (9, 0) and is_flash_attn_4_available():
            return "flash_attention_4"
        # transformers' own check, not find_spec("flash_attn"): FlashAttention-4 installs a package of
        # that name too (flash_attn.cute), without the varlen kernel flash_attention_2 calls
        if is_flash_attn_2_available():
            return "flash_attention_2"
    return DOCUMENT_FLEX if packing else "sdpa"
