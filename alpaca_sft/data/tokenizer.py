"""The tokenizer, with a pad token that can never be mistaken for the EOS the model must learn."""

from __future__ import annotations

from transformers import AutoTokenizer


def load_tokenizer(name_or_path: str, revision: str | None = None):
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    # Mistral ships no pad token. TRL 1.16 would pad with EOS and still learn the EOS (its collator
    # masks pads by position, not by id), but batched generation and our label checks tell a pad
    # from the EOS by its id; <unk> is never produced by the byte-fallback tokenizer, so it pads.
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an <unk> to pad with; set pad_token")
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer
