"""A model folder's tokenizer (its tokenizer.json, as transformers runs it) as GGUF metadata, in the two forms
llama.cpp runs: a SentencePiece-style vocabulary ("llama": pieces, scores and types; Mistral, Llama 2, Gemma) or
a byte-level BPE ("gpt2": tokens, merges and the name of its pre-tokenizer split; Llama 3, Qwen2). A tokenizer the
format cannot express is refused: a SentencePiece-style one is encoded as llama.cpp would (models/spm.py's
reference) and must give the folder's ids; a byte-level one must split text as a split llama.cpp names.
Also the chat template: the Alpaca prompt the model was tuned on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..data.template import PROMPT_NO_INPUT
from ..models.gguf import BYTE_LEVEL_SPLITS
from ..models.spm import BYTE, CHECK_TEXTS, CONTROL, NORMAL, SPACE, UNKNOWN, UNUSED, USER_DEFINED, Vocabulary, \
    reference_encode


class ExportError(ValueError):
    """The folder cannot be written as a GGUF as asked (release/gguf_export.py); the message says why and what to do."""


SPLIT_NAMES = {split: name for name, split in BYTE_LEVEL_SPLITS.items()}  # a tokenizer.json regex -> its llama.cpp name
BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")


@dataclass
class GgufTokenizer:
    model: str  # "llama": SentencePiece-style pieces with scores; "gpt2": byte-level BPE with merges
    pre: str  # the pre-tokenizer's name ("default" for SentencePiece-style)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    add_space_prefix: bool | None
    special: dict  # bos, eos, unk, pad: ids or None; add_bos


def _id_ordered(spec: dict, rows: int) -> tuple[list[str], dict[int, dict]]:
    """Every token by id (the model's vocabulary and the added tokens), filled up to the embedding's rows with
    unused placeholders as llama.cpp's converter does; and the added tokens by id."""
    added = {token["id"]: token for token in spec.get("added_tokens", [])}
    by_id = {i: piece for piece, i in spec["model"]["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    if max(by_id) >= rows:
        raise ExportError(f"the tokenizer has ids up to {max(by_id)} but the model's embedding only {rows} rows")
    return [by_id.get(i, f"[PAD{i}]") for i in range(rows)], added


def _sentencepiece_style(spec: dict, tokens: list[str], added: dict, tokenizer) -> Vocabulary:
    """A byte-fallback BPE over "▁"-spaced text (Mistral, Llama 2, Gemma) as a SentencePiece vocabulary: each piece
    scored by the rank of the first merge that forms it, so that "merge the best-scoring pair" (llama.cpp) takes
    the merges in transformers' order."""
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), r)
    vocabulary, unk = spec["model"]["vocab"], tokenizer.unk_token
    types = [UNKNOWN if token == unk else CONTROL if i in added and added[i]["special"] else USER_DEFINED if i in added
             else BYTE if BYTE_PIECE.match(token) else NORMAL if token in vocabulary else UNUSED
             for i, token in enumerate(tokens)]
    scores = [-float(rank.get(token, len(merges))) if kind == NORMAL else 0.0 for token, kind in zip(tokens, types)]
    first = tokenizer.convert_ids_to_tokens(tokenizer("x", add_special_tokens=False)["input_ids"])[0]
    return Vocabulary(tokens, scores, types, add_space_prefix=first.startswith(SPACE))


def _byte_level_pre(spec: dict) -> str:
    """The llama.cpp name of a byte-level BPE's pre-tokenizer (its split regex), or why there is none."""
    pre, normalizer = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    steps = pre.get("pretokenizers", [pre])
    split = steps[0].get("pattern", {}).get("Regex") if steps[0].get("type") == "Split" else None
    byte_level = steps[-1] if len(steps) == 2 and steps[-1].get("type") == "ByteLevel" else {}
    # NFC (Qwen2's) is not applied by llama.cpp: the same ids on text already composed, as nearly all text is.
    if split not in SPLIT_NAMES or byte_level.get("add_prefix_space") or byte_level.get("use_regex", True) \
            or (normalizer and normalizer.get("type") != "NFC"):
        raise ExportError(f"its byte-level tokenizer splits text in a way this writer cannot name for llama.cpp "
                          f"(pre-tokenizer {json.dumps(pre)[:200]}, normalizer {json.dumps(normalizer)}); "
                          "known: Llama 3's and Qwen2's splits")
    return SPLIT_NAMES[split]


def read_tokenizer(model_dir: Path, rows: int) -> GgufTokenizer:
    """The folder's tokenizer (tokenizer.json, as transformers runs it) in the form a GGUF holds, checked."""
    from transformers import AutoTokenizer

    if not (model_dir / "tokenizer.json").is_file():
        raise ExportError(f"{model_dir} holds no tokenizer.json (save the model's fast tokenizer into it)")
    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    if tokenizer.eos_token_id is None:
        raise ExportError(f"{model_dir}: its tokenizer names no EOS token, which llama.cpp needs to stop")
    if spec["model"].get("type") != "BPE":
        raise ExportError(f"{model_dir}: a {spec['model'].get('type')} tokenizer; this writer expresses BPE ones only "
                          "(SentencePiece-style with byte fallback, or byte-level)")
    tokens, added = _id_ordered(spec, rows)
    bos = tokenizer.bos_token_id
    special = {"bos": bos, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id,
               "add_bos": bos is not None and tokenizer("x")["input_ids"][:1] == [bos]}
    if spec["model"].get("byte_fallback"):
        vocabulary = _sentencepiece_style(spec, tokens, added, tokenizer)
        check_sentencepiece_style(vocabulary, tokenizer)
        return GgufTokenizer("llama", "default", tokens, vocabulary.types, vocabulary.scores, None,
                             vocabulary.add_space_prefix, special)
    pre = _byte_level_pre(spec)
    types = [CONTROL if i in added and added[i]["special"] else USER_DEFINED if i in added
             else NORMAL if token in spec["model"]["vocab"] else UNUSED for i, token in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return GgufTokenizer("gpt2", pre, tokens, types, None, merges, None, special)


def check_sentencepiece_style(vocabulary: Vocabulary, tokenizer, texts=CHECK_TEXTS) -> None:
    """llama.cpp's SentencePiece-style encoding of the vocabulary (models/spm.py's reference) must give the ids the
    folder's tokenizer gives, or the format cannot express this tokenizer."""
    for text in texts:
        want = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        got = reference_encode(text, vocabulary)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise ExportError(f"its tokenizer cannot be expressed as a SentencePiece-style GGUF vocabulary: "
                              f"{text[:40]!r} is {len(want)} tokens, as llama.cpp would encode it {len(got)}; first "
                              f"difference at token {at}: {want[at:at + 4]} vs {got[at:at + 4]}")


# The Alpaca prompt the model was tuned on, as the chat template (Jinja, which llama.cpp and LM Studio read): a user
# message is the instruction; an assistant message is an answer and the EOS the model learned to write after it.
ALPACA_PROMPT_AROUND = tuple(PROMPT_NO_INPUT.split("{instruction}"))  # the text before and after the instruction


def chat_template(adds_bos: bool) -> str:
    """With the BOS first where the tokenizer puts one in front, as chat templates do (transformers renders then
    tokenizes without special tokens; llama.cpp strips a template's BOS where it adds its own)."""
    return (("{{ bos_token }}" if adds_bos else "") + "{%- for message in messages %}{% if message['role'] == 'user' %}"
            + ALPACA_PROMPT_AROUND[0] + "{{ message['content'] }}" + ALPACA_PROMPT_AROUND[1]
            + "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


def write_tokenizer(writer, tokenizer: GgufTokenizer) -> None:
    writer.add_tokenizer_model(tokenizer.model)
    writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(tokenizer.tokens)
    writer.add_token_types(tokenizer.types)
    if tokenizer.scores is not None:
        writer.add_token_scores(tokenizer.scores)
    if tokenizer.merges is not None:
        writer.add_token_merges(tokenizer.merges)
    if tokenizer.add_space_prefix is not None:
        writer.add_add_space_prefix(tokenizer.add_space_prefix)
    special = tokenizer.special
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if special[key] is not None:
            add(special[key])
    writer.add_add_bos_token(special["add_bos"])
    writer.add_add_eos_token(False)  # a prompt ends where the answer starts, never in an EOS (models/tokenizer.py)
    writer.add_chat_template(chat_template(special["add_bos"]))
