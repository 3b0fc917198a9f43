"""The tokenizer of any causal-LM base, its special tokens settled in one place.

Bases differ in what their tokenizer brings: Mistral and Llama 2 have <unk> but no pad, Llama 3 has
neither (but reserved special tokens), Qwen2's pad is its EOS, Gemma has its own <pad>; some add a
BOS, some do not; EOS ids range from 1 to 151,643. What the pipeline needs of all of them:

- an EOS, since the EOS after each response is what teaches the model to stop;
- a pad that is never the EOS, so that nothing which masks labels by the pad's id (transformers'
  DataCollatorForLanguageModeling, TRL's collators before 1.0: trl#1623) can erase the EOS labels, and
  so that a batched generation's padding is never read as an answer that stopped;
- prompts encoded without an EOS at their end (a tokenizer set to append one would end every prompt
  with "stop"), and with the BOS the base adds, if any, exactly as inference will see it.
"""

from __future__ import annotations

import re

from transformers import AutoTokenizer

# Names a base's tokenizer gives tokens that are safe to pad with, best first: a pad of its own, the
# unknown token (never produced by a byte-fallback or byte-level tokenizer), then reserved/unused slots.
PAD_NAME_PATTERNS = (r"pad", r"^<unk>$|^\[UNK\]$", r"reserved|unused")


class TokenizerError(ValueError):
    """The tokenizer cannot serve this pipeline as it is; the message says what to change."""


NEW_PAD = "<|pad|>"


def load_tokenizer(name_or_path: str, revision: str | None = None):
    """The base's tokenizer with its special tokens settled (see the module's docstring)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as err:  # no tokenizer files, or ones transformers cannot read
        raise TokenizerError(f"cannot load the tokenizer of {name_or_path}: {err}") from None
    return settle_special_tokens(tokenizer, name_or_path, embedding_rows=_embedding_rows(name_or_path, revision))


def _embedding_rows(name_or_path: str, revision: str | None) -> int | None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=False)
    except Exception:  # a tokenizer-only folder: no model to make room in
        return None
    return getattr(config.get_text_config(), "vocab_size", None)


def settle_special_tokens(tokenizer, name: str = "the tokenizer", embedding_rows: int | None = None):
    """`embedding_rows`: the base's vocabulary size. Where it exceeds the tokenizer's (Qwen2 keeps 290 spare
    rows), a base with nothing to pad with gets a pad token of its own in a spare row, which padding never
    lets the model attend to or be trained on."""
    if tokenizer.eos_token_id is None:
        raise TokenizerError(f"{name} has no EOS token: the model could never learn to stop; set eos_token")
    if _appends_eos(tokenizer):
        tokenizer.add_eos_token = False  # transformers' sentencepiece-style tokenizers rebuild their post-processor
        if _appends_eos(tokenizer):
            raise TokenizerError(f"{name} appends EOS to every text it encodes, and cannot be told not to: "
                                 "set add_eos_token: false in its tokenizer_config.json")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        pad = _pad_candidate(tokenizer)
        if pad is None and embedding_rows is not None and len(tokenizer) < embedding_rows:
            tokenizer.add_special_tokens({"pad_token": NEW_PAD})
            return tokenizer
        if pad is None:
            raise TokenizerError(
                f"{name} has no token to pad with other than its EOS ({tokenizer.eos_token!r}): padding with EOS lets "
                "label masking by id erase the EOS the model must learn. Add one to its tokenizer_config.json "
                "(pad_token), choosing a token the model never needs to produce")
        tokenizer.pad_token = pad
    return tokenizer


def _appends_eos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[-1] == tokenizer.eos_token_id


def _pad_candidate(tokenizer) -> str | None:
    """A special token of the base's own, other than EOS and BOS, named like a pad, an unknown or a reserved slot."""
    taken = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    specials = [(tokenizer.unk_token, tokenizer.unk_token_id)] if tokenizer.unk_token is not None else []
    specials += [(token.content, index) for index, token in sorted(tokenizer.added_tokens_decoder.items()) if token.special]
    for pattern in PAD_NAME_PATTERNS:
        for token, index in specials:
            if index not in taken and re.search(pattern, token, flags=re.IGNORECASE):
                return token
    return None
