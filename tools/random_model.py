"""Random-weight Mistral models with the real Mistral-7B-v0.1 tokenizer, for runs without the Hub.

    python tools/random_model.py build/tiny-mistral            # 2 layers, for CPU runs and tests
    python tools/random_model.py /tmp/mistral-7b --size 7b     # the full Mistral-7B-v0.1 shape, bf16

Same architecture code and tokenizer as Mistral-7B-v0.1 (vocabulary 32,000, GQA, RoPE, SwiGLU).
The tokenizer.model comes from the `mistral-common` package, whose copy is byte-identical to the
one published with Mistral-7B-v0.1.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import shutil
from pathlib import Path

# Mistral-7B-v0.1's tokenizer_config.json, in substance.
TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}


def _tokenizer_json(model_file: Path):
    """The fast-tokenizer file that Mistral-7B-v0.1 publishes beside tokenizer.model, rebuilt from
    it: byte-fallback BPE with sentencepiece's merges, "▁" for spaces, BOS prepended. Without it,
    transformers v5 converts tokenizer.model itself, differently across versions (5.17 drops the
    prefix space; 5.24 splits doubled spaces unlike sentencepiece)."""
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scored = []
    for i in range(sp.get_piece_size()):
        if sp.is_unknown(i) or sp.is_control(i) or sp.is_byte(i):
            continue
        piece = sp.id_to_piece(i)
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        scored += [(*pair, sp.get_score(i)) for pair in sorted(splits, key=lambda m: (vocab[m[0]], vocab[m[1]]))]
    merges = [(left, right) for left, right, _ in sorted(scored, key=lambda m: m[2], reverse=True)]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def write_mistral_tokenizer(folder: Path) -> Path:
    """tokenizer.model, tokenizer.json and tokenizer_config.json, laid out as in the Hub repo."""
    try:
        source = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    except ModuleNotFoundError as err:
        raise SystemExit("the real Mistral tokenizer ships in mistral-common: pip install --no-deps mistral-common") from err
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with importlib.resources.as_file(source) as model_file:
        shutil.copyfile(model_file, folder / "tokenizer.model")
    _tokenizer_json(folder / "tokenizer.model").save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    return folder


MISTRAL_7B = dict(  # mistralai/Mistral-7B-v0.1 config.json
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    sliding_window=4096,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
# 2 layers of width 64. The init is wider than a real model's (0.2, not 0.02): at 0.02 a 64-wide
# lm_head cannot put a logit more than ~1.3 above the rest, so no amount of LoRA training could
# make the model confident enough to copy a response and stop.
TINY = dict(
    MISTRAL_7B,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    sliding_window=None,
    initializer_range=0.2,
)


def build_random_mistral(folder: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Writes a random model of that size and the Mistral tokenizer to folder. The 7B one is built
    in bf16 on the GPU when there is one (seconds, instead of minutes of CPU init)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    folder = Path(folder)
    config = MistralConfig(**(MISTRAL_7B if size == "7b" else TINY))
    torch.manual_seed(seed)
    if size == "7b":
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = MistralForCausalLM._from_config(config, dtype=torch.bfloat16)
    else:
        model = MistralForCausalLM(config)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    write_mistral_tokenizer(folder)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="build/tiny-mistral")
    parser.add_argument("--size", choices=("tiny", "7b"), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer_only", action="store_true", help="write only the Mistral tokenizer files")
    args = parser.parse_args()
    print(write_mistral_tokenizer(args.folder) if args.tokenizer_only else build_random_mistral(args.folder, args.size, args.seed))
