"""A tiny random Mistral with the real Mistral-7B-v0.1 tokenizer, for CPU runs and tests.

    python -m alpaca_sft.tiny_model build/tiny-mistral

Same architecture code and tokenizer as Mistral-7B-v0.1 (vocabulary 32,000, GQA, RoPE, SwiGLU),
a few hundred kilobytes of layers. The tokenizer.model comes from the `mistral-common` package,
whose copy is byte-identical to the one published with Mistral-7B-v0.1.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import shutil
from pathlib import Path

# Mistral-7B-v0.1's special tokens. No "tokenizer_class": under transformers v5 the class
# "LlamaTokenizer" rebuilt from tokenizer.model splits doubled spaces after a newline differently
# from sentencepiece (e.g. "\n  two" -> "▁▁","two" instead of "▁","▁two"), while the generic
# backend reproduces sentencepiece exactly; tests/test_data.py checks against raw sentencepiece.
TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}


def write_mistral_tokenizer(folder: Path) -> Path:
    try:
        source = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    except ModuleNotFoundError as err:
        raise SystemExit("the real Mistral tokenizer ships in mistral-common: pip install --no-deps mistral-common") from err
    folder.mkdir(parents=True, exist_ok=True)
    with importlib.resources.as_file(source) as model_file:
        shutil.copyfile(model_file, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    return folder


def build_tiny_mistral(folder: str | Path, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """Writes the model and tokenizer to folder. The init is wider than a real model's (0.2, not 0.02):
    at 0.02 a 64-wide lm_head cannot put a logit more than ~1.3 above the rest, so no amount of
    LoRA training could make such a model confident enough to copy a response and stop."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    folder = Path(folder)
    config = MistralConfig(
        vocab_size=32000,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    write_mistral_tokenizer(folder)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="build/tiny-mistral")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny_mistral(args.folder, seed=args.seed))
