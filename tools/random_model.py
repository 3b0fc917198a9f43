"""Random-weight models with their family's real tokenizer conventions, for runs without the Hub.

    python tools/random_model.py build/tiny-mistral                 # 2 layers, for CPU runs and tests
    python tools/random_model.py build/tiny-gemma3 --arch gemma3    # also: llama, qwen2
    python tools/random_model.py /tmp/mistral-7b --size 7b          # the full Mistral-7B-v0.1 shape, bf16

Mistral: the same architecture code and tokenizer as Mistral-7B-v0.1 (vocabulary 32,000, GQA, RoPE,
SwiGLU). The tokenizer.model comes from the `mistral-common` package, whose copy is byte-identical to
the one published with Mistral-7B-v0.1.

The other architectures are tiny too, each with a tokenizer made the way its family's is, so that the
pipeline meets what real bases bring (models/tokenizer.py):
- llama: Llama 3's byte-level BPE (trained here on the Alpaca sample), BOS added, no pad and no unk,
  reserved special tokens, EOS far from id 2;
- qwen2: Qwen2's byte-level BPE, no BOS, its pad the EOS, spare embedding rows;
- gemma3: Gemma's SentencePiece-style vocabulary (Mistral's pieces under Gemma's special ids, no prefix
  space) as a GGUF conversion writes it, and Gemma 3's head_dim, sliding-window and full layers, tied
  embeddings.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # as a script, for alpaca_sft (the Gemma tokenizer is the GGUF converter's)

# Mistral-7B-v0.1's tokenizer_config.json, in substance.
TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}


def _mistral_tokenizer_model():
    try:
        return importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    except ModuleNotFoundError as err:
        raise SystemExit("the real Mistral tokenizer ships in mistral-common: pip install --no-deps mistral-common") from err


def write_mistral_tokenizer(folder: Path) -> Path:
    """tokenizer.model, tokenizer.json and tokenizer_config.json, laid out as in the Hub repo. The tokenizer.json
    Mistral-7B-v0.1 publishes beside tokenizer.model is rebuilt from it (byte-fallback BPE with sentencepiece's
    merges, "▁" for spaces, BOS prepended: alpaca_sft/models/spm.py); without it, transformers v5 converts
    tokenizer.model itself, differently across versions (5.17 drops the prefix space; 5.24 splits doubled spaces
    unlike sentencepiece)."""
    from alpaca_sft.models.spm import build_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with importlib.resources.as_file(_mistral_tokenizer_model()) as model_file:
        shutil.copyfile(model_file, folder / "tokenizer.model")
    build_tokenizer(mistral_vocabulary(), bos_id=1, unk_id=0).save(str(folder / "tokenizer.json"))
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


ARCHITECTURES = ("mistral", "llama", "qwen2", "gemma3")


def mistral_vocabulary():
    """Mistral-7B-v0.1's tokenizer.model as a models/spm.py Vocabulary: its pieces, scores and SentencePiece
    types, as a GGUF of it carries them."""
    import sentencepiece

    from alpaca_sft.models.spm import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, Vocabulary

    with importlib.resources.as_file(_mistral_tokenizer_model()) as model_file:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    kinds = ((sp.is_control, CONTROL), (sp.is_unknown, UNKNOWN), (sp.is_byte, BYTE), (sp.is_unused, UNUSED))
    ids = range(sp.get_piece_size())
    return Vocabulary([sp.id_to_piece(i) for i in ids], [sp.get_score(i) for i in ids],
                      [next((kind for test, kind in kinds if test(i)), NORMAL) for i in ids], add_space_prefix=True)


# Gemma's special ids, as models/gguf.py's read_vocabulary returns them: <pad> 0, <eos> 1, <bos> 2, <unk> 3.
GEMMA_SPECIAL = {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "add_bos": True}


def gemma_vocabulary():
    """Gemma's layout over Mistral's pieces: <pad>, <eos>, <bos>, <unk>, the turn markers (control), "\\n"
    and "\\n\\n" (user-defined: matched whole, as in Gemma's vocabulary), then Mistral's byte and text
    pieces with their scores, shifted; no prefix space."""
    from alpaca_sft.models.spm import CONTROL, UNKNOWN, USER_DEFINED, Vocabulary

    mistral = mistral_vocabulary()
    own = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", UNKNOWN),
           ("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL), ("\n", USER_DEFINED), ("\n\n", USER_DEFINED)]
    first_text = 3  # Mistral's own <unk>, <s>, </s> come first
    return Vocabulary([p for p, _ in own] + mistral.pieces[first_text:], [-1000.0] * len(own) + mistral.scores[first_text:],
                      [t for _, t in own] + mistral.types[first_text:], add_space_prefix=False)


def write_gemma_tokenizer(folder: Path) -> Path:
    """tokenizer.json and tokenizer_config.json as models/gguf.py writes them for a Gemma GGUF."""
    from alpaca_sft.models.gguf import write_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(gemma_vocabulary(), GEMMA_SPECIAL, folder)
    return folder


# The pre-tokenizer splits of Llama 3's and Qwen2's tokenizer.json (Qwen2's takes digits one at a time).
LLAMA3_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
BYTE_LEVEL_MERGED_VOCABULARY = 768  # 256 bytes and 512 merges: enough for the Alpaca words to be pieces
# Llama 3's specials, in its order (ids 128000 on there; after the trained pieces here).
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)] + [
    "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"] + [
    f"<|reserved_special_token_{i}|>" for i in range(5, 11)]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _training_corpus() -> list[str]:
    """The Alpaca sample's texts and the prompt templates: a small fixed corpus, so the trained
    tokenizer is the same on every run."""
    from alpaca_sft.data.template import PROMPT_NO_INPUT, PROMPT_SQL, PROMPT_WITH_INPUT, SQL_INSTRUCTION

    rows = [json.loads(line) for line in (REPO / "data" / "alpaca_sample.jsonl").read_text(encoding="utf-8").splitlines()]
    return [PROMPT_WITH_INPUT, PROMPT_NO_INPUT, PROMPT_SQL, SQL_INSTRUCTION] + [
        row[key] for row in rows for key in ("instruction", "input", "output") if row[key]]


def _byte_level_bpe(split: str, specials: list[str], normalizer=None):
    """A byte-level BPE trained on _training_corpus, its specials added after the trained pieces."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BYTE_LEVEL_MERGED_VOCABULARY, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_training_corpus(), trainer)
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in specials])
    return tokenizer


def write_llama3_tokenizer(folder: Path) -> Path:
    """Llama 3's conventions: byte-level BPE, <|begin_of_text|> put in front by the post-processor,
    <|end_of_text|> the EOS, reserved special tokens, and no pad or unk at all."""
    from tokenizers import processors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _byte_level_bpe(LLAMA3_SPLIT, LLAMA3_SPECIALS)
    bos = LLAMA3_SPECIALS[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    tokenizer.save(str(folder / "tokenizer.json"))
    # Llama 3's tokenizer_config.json, in substance (its clean_up_tokenization_spaces: transformers 5.24
    # ignores it for BPE, so decoding still gives the text back).
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": LLAMA3_SPECIALS[1],
              "clean_up_tokenization_spaces": True, "model_max_length": 131072}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def write_qwen2_tokenizer(folder: Path) -> Path:
    """Qwen2's conventions: byte-level BPE after NFC, no BOS, <|endoftext|> both the EOS and the pad, no unk."""
    from tokenizers import normalizers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _byte_level_bpe(QWEN2_SPLIT, QWEN2_SPECIALS, normalizers.NFC()).save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "add_prefix_space": False, "errors": "replace",
              "clean_up_tokenization_spaces": False, "split_special_tokens": False, "model_max_length": 131072}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


TOKENIZER_WRITERS = {"mistral": write_mistral_tokenizer, "llama": write_llama3_tokenizer,
                     "qwen2": write_qwen2_tokenizer, "gemma3": write_gemma_tokenizer}

# TINY's size for every architecture, with each family's own choices where they differ.
_TINY_SHAPE = {k: TINY[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                    "max_position_embeddings", "initializer_range")}
TINY_CONFIGS = {
    "mistral": ("MistralConfig", "MistralForCausalLM", TINY),
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(_TINY_SHAPE, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",  # q, k and v with biases, as Qwen2's always have
              dict(_TINY_SHAPE, num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    # Gemma 3: head_dim not hidden/heads (q_proj 64 -> 128), one KV head, a sliding window shorter than the
    # test documents on the first layer and full attention on the second, tied embeddings.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(_TINY_SHAPE, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)),
}
# Qwen2's embedding keeps spare rows past its tokenizer (151,936 for 151,646 tokens): a multiple of 64 here.
EMBEDDING_ROWS_MULTIPLE = {"qwen2": 64}


def tiny_model(arch: str, vocab_size: int, seed: int = 0, **token_ids):
    """The tiny random model of `arch` with `vocab_size` embedding rows, in fp32.

    Gemma's norms scale by (1 + weight) and start at 0: they get random multiples of 1/64 (exact in bf16,
    and after llama.cpp's +1) so that a norm misplaced or left unshifted in a conversion shows."""
    import torch
    import transformers

    config_name, model_name, shape = TINY_CONFIGS[arch]
    config = getattr(transformers, config_name)(**dict(shape, vocab_size=vocab_size, **token_ids))
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    if arch == "gemma3":
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if name.endswith("norm.weight"):
                    weight.copy_(torch.randint(-32, 33, weight.shape) / 64)
    return model


def build_random_model(folder: str | Path, arch: str = "mistral", seed: int = 0) -> Path:
    """Writes the tiny random model of `arch` and its family's tokenizer to folder (mistral: build_random_mistral)."""
    from transformers import AutoTokenizer

    if arch == "mistral":
        return build_random_mistral(folder, seed=seed)
    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_WRITERS[arch](folder), trust_remote_code=False)
    multiple = EMBEDDING_ROWS_MULTIPLE.get(arch, 1)
    rows = -(-len(tokenizer) // multiple) * multiple
    model = tiny_model(arch, rows, seed, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="build/tiny-mistral")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="mistral")
    parser.add_argument("--size", choices=("tiny", "7b"), default="tiny", help="7b: Mistral-7B-v0.1's shape (mistral only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer_only", action="store_true", help="write only the architecture's tokenizer files")
    args = parser.parse_args()
    if args.size == "7b" and args.arch != "mistral":
        parser.error("--size 7b builds Mistral-7B-v0.1's shape: use it with --arch mistral")
    if args.tokenizer_only:
        print(TOKENIZER_WRITERS[args.arch](args.folder))
    elif args.arch == "mistral":
        print(build_random_mistral(args.folder, args.size, args.seed))
    else:
        print(build_random_model(args.folder, args.arch, args.seed))
