"""SentencePiece-style BPE vocabularies (Mistral's tokenizer.model, a GGUF's "llama" tokenizer): a fast
tokenizer built from one, and an independent encoder to check that tokenizer against.

A vocabulary is a list of pieces with a score and a type each. Encoding, as SentencePiece and llama.cpp
do it: user-defined pieces (Gemma's "\\n\\n", runs of spaces, "<table>") are matched whole, longest first,
in the raw text; the rest has its spaces written as "▁" (and one put in front where the vocabulary says
so), is split into characters, and the adjacent pair whose concatenation is the best-scoring piece is
merged, again and again; a character the vocabulary lacks becomes its UTF-8 bytes (<0x41>). Control
pieces (<bos>, <eos>, <pad>) are never produced from text.

`build_tokenizer` expresses that with the `tokenizers` library (what transformers runs): merges ranked by
the merged piece's score, user-defined pieces as added tokens, byte fallback. `reference_encode` is the
same procedure written out in plain Python, slow and obvious, so that a conversion that goes wrong (a
transformers version that converts a GGUF's tokenizer differently, a merge order taken from the wrong
field) is caught on known strings before anything trains on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece's (and GGUF's) piece types
SPACE = "\u2581"


@dataclass
class Vocabulary:
    pieces: list[str]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool  # "▁" put in front of the text (Mistral, Llama 2: yes; Gemma: no)

    @cached_property
    def ids(self) -> dict[str, int]:
        ids = {}
        for i, piece in enumerate(self.pieces):
            ids.setdefault(piece, i)
        return ids

    @cached_property
    def mergeable(self) -> dict[str, tuple[float, int]]:
        """Pieces BPE may form, with their priority (higher score first, then lower id)."""
        return {p: (-self.scores[i], i) for i, p in enumerate(self.pieces) if self.types[i] in (NORMAL, UNUSED)}

    @cached_property
    def user_defined(self) -> list[str]:
        return sorted((p for i, p in enumerate(self.pieces) if self.types[i] == USER_DEFINED), key=len, reverse=True)

    def token(self, kind_id: int | None) -> str | None:
        return self.pieces[kind_id] if kind_id is not None else None


def _segments(text: str, vocabulary: Vocabulary) -> list[tuple[str, bool]]:
    """The text cut into user-defined pieces (True) and the stretches between them (False), matching the
    longest user-defined piece at the leftmost position first."""
    pieces, out, start, i = vocabulary.user_defined, [], 0, 0
    while i < len(text):
        match = next((p for p in pieces if text.startswith(p, i)), None) if pieces else None
        if match:
            if start < i:
                out.append((text[start:i], False))
            out.append((match, True))
            i = start = i + len(match)
        else:
            i += 1
    if start < len(text):
        out.append((text[start:], False))
    return out


def reference_encode(text: str, vocabulary: Vocabulary) -> list[int]:
    """The ids SentencePiece's BPE gives `text` (no BOS), by the procedure in this module's docstring."""
    ids, first = [], True
    for segment, whole in _segments(text, vocabulary):
        if whole:
            ids.append(vocabulary.ids[segment])
            first = False
            continue
        normalized = segment.replace(" ", SPACE)
        if first and vocabulary.add_space_prefix:
            normalized = SPACE + normalized
        first = False
        symbols = list(normalized)
        while len(symbols) > 1:
            best = min(((vocabulary.mergeable[symbols[k] + symbols[k + 1]], k) for k in range(len(symbols) - 1)
                        if symbols[k] + symbols[k + 1] in vocabulary.mergeable), default=None)
            if best is None:
                break
            k = best[1]
            symbols[k : k + 2] = [symbols[k] + symbols[k + 1]]
        for symbol in symbols:
            if symbol in vocabulary.ids and vocabulary.types[vocabulary.ids[symbol]] != CONTROL:
                ids.append(vocabulary.ids[symbol])
            else:
                ids += [vocabulary.ids[f"<0x{byte:02X}>"] for byte in symbol.encode("utf-8")]
    return ids


def build_tokenizer(vocabulary: Vocabulary, bos_id: int | None, unk_id: int | None):
    """A `tokenizers.Tokenizer` that encodes as reference_encode does, with the BOS put in front if bos_id."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    ids, mergeable = vocabulary.ids, vocabulary.mergeable
    ranked = []
    for piece, priority in mergeable.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        ranked += [(priority, ids[left], ids[right], left, right) for left, right in splits]
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    vocab = {piece: i for piece, i in ids.items()}
    unk = vocabulary.pieces[unk_id] if unk_id is not None else None
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = ([normalizers.Prepend(SPACE)] if vocabulary.add_space_prefix else []) + [normalizers.Replace(" ", SPACE)]
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if vocabulary.add_space_prefix else [])
    )
    return with_pieces_added(tokenizer, vocabulary, {CONTROL: True, USER_DEFINED: False, UNKNOWN: True}, bos_id)


def with_pieces_added(tokenizer, vocabulary, kinds: dict[int, bool], bos_id: int | None):
    """The tokenizer with the vocabulary's pieces of `kinds` (token type: special or not) matched whole, and the
    BOS put first where the model's tokenizer adds one."""
    from tokenizers import AddedToken, processors

    tokenizer.add_tokens([AddedToken(p, normalized=False, special=kinds[t]) for p, t in zip(vocabulary.pieces, vocabulary.types)
                          if t in kinds])
    if bos_id is not None:
        bos = vocabulary.pieces[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return tokenizer


# Strings a conversion is checked on: the Alpaca template, code with indentation, SQL, numbers, runs of
# spaces and newlines, a tab, text that starts with a space, accents, CJK, an emoji, and a special token
# written as text (which must stay text).
CHECK_TEXTS = (
    "Give three tips for staying healthy.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName the capital of Japan.\n\n### Response:\nTokyo",
    "def add(a, b):\n    return a + b\n\n\nclass A:\n        pass",
    'SELECT class FROM table_name_12 WHERE frequency_mhz > 91.5 AND city_of_license = "hyannis, nebraska"',
    "3.14159 + 2,718 = 5.85959; 1e-3 x 10^6 ... 100%",
    "  leading spaces, trailing spaces   ",
    "a\tb\t\tc |     wide      | columns\n\n\n\n|",
    "Le chat dort sur le canapé. Ünïcödé — «quotes»",
    "日本語のテキストと中文文本。한국어 텍스트.",
    "an emoji 🤖 and a rare character ⟁",
    "</s> <eos> <bos> <unk> are text here",
)
