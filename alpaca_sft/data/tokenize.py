"""Supervised token rows: prompt + response + EOS, with the loss on the response and the EOS only.

The prompt's tokens are the ones an inference call on the prompt alone sees; the response's are
taken from the joint tokenization whenever the prompt's tokens are its exact prefix (the
sentencepiece boundary problem of trl#980), and re-derived otherwise, so that the trained span
always decodes to exactly the response.
"""

from __future__ import annotations

from .records import DataError

IGNORE_INDEX = -100  # labels at this value carry no loss (PyTorch's cross-entropy default)
BATCH = 1024  # examples per tokenizer call


def _encode(tokenizer, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    # split_special_tokens: a response that says "</s>" in its text must not become an EOS token.
    return tokenizer(texts, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"]


def _completion_after_newline(tokenizer, completion: str) -> list[int] | None:
    """The completion's tokens as they follow a newline, found by encoding "\\n" + completion and
    removing the tokens of "\\n" alone; None if even that does not split."""
    anchor = _encode(tokenizer, ["\n"], add_special_tokens=False)[0]
    ids = _encode(tokenizer, ["\n" + completion], add_special_tokens=False)[0]
    return ids[len(anchor) :] if ids[: len(anchor)] == anchor else None


def tokenize(examples: list[dict[str, str]], tokenizer) -> tuple[list[dict[str, list[int]]], int]:
    """input_ids = prompt + response + EOS; labels = -100 over the prompt, the ids elsewhere. Also
    returns how many responses had to be re-derived at the boundary."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token: the model could never learn to stop")
    eos = tokenizer.eos_token_id
    rows, retokenized = [], 0
    for start in range(0, len(examples), BATCH):
        batch = examples[start : start + BATCH]
        prompts = _encode(tokenizer, [e["prompt"] for e in batch])
        fulls = _encode(tokenizer, [e["prompt"] + e["completion"] for e in batch])
        for example, prompt_ids, full_ids in zip(batch, prompts, fulls):
            if full_ids[: len(prompt_ids)] == prompt_ids:
                completion_ids = full_ids[len(prompt_ids) :]
            else:
                retokenized += 1
                completion_ids = _completion_after_newline(tokenizer, example["completion"])
                if not completion_ids or tokenizer.decode(prompt_ids + completion_ids) != tokenizer.decode(full_ids):
                    raise DataError(
                        f"{example['where']}: its response cannot be tokenized apart from its prompt; "
                        "the prompt template must end at a token boundary (end it with a newline)"
                    )
            rows.append(
                {
                    "input_ids": prompt_ids + completion_ids + [eos],
                    "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [eos],
                }
            )
    return rows, retokenized
