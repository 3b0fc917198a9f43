"""A Gemma 3 GGUF written the way llama.cpp's converter (convert_hf_to_gguf.py) writes one, for tests: its
tensor names, Gemma's norms stored as 1 + weight, the gemma3.* metadata and a SentencePiece-style ("llama")
tokenizer, from any transformers Gemma3ForCausalLM and models/spm.py Vocabulary."""

from pathlib import Path

import gguf
import numpy as np

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def gguf_tensors(model, quantized: tuple[str, ...] = ()) -> dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]:
    """The model's weights under llama.cpp's names, as stored: F32, or Q8_0 for the names in `quantized`."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config.num_hidden_layers)
    tensors = {}
    for hf_name, weight in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp writes no output.weight, and readers take that as tied
        module, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(module)}.{suffix}"
        data = weight.detach().float().numpy()
        if hf_name.endswith("norm.weight"):
            data = data + 1  # Gemma's RMSNorm scales by (1 + weight); llama.cpp stores the sum
        kind = Q8_0 if name in quantized else gguf.GGMLQuantizationType.F32
        tensors[name] = (gguf.quants.quantize(data, kind) if kind == Q8_0 else data, kind)
    return tensors


def write_gemma3_gguf(path: Path, model, vocabulary, special: dict, quantized: tuple[str, ...] = ()) -> Path:
    """`special`: bos, eos, unk, pad ids and add_bos, as models/gguf.py's read_vocabulary returns them."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name("tiny gemma3")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    writer.add_sliding_window(config.sliding_window)

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocabulary.pieces)
    writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.types)
    writer.add_bos_token_id(special["bos"])
    writer.add_eos_token_id(special["eos"])
    writer.add_unk_token_id(special["unk"])
    writer.add_pad_token_id(special["pad"])
    writer.add_add_bos_token(special["add_bos"])
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(vocabulary.add_space_prefix)

    for name, (data, kind) in gguf_tensors(model, quantized).items():
        writer.add_tensor(name, data, raw_dtype=kind if kind == Q8_0 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def write_tokenizer_only_gguf(path: Path, tokenizer_model: str, tokens: list[str], eos: int | None = None) -> Path:
    """A GGUF with nothing but a tokenizer of that kind ("gpt2": a byte-level BPE), and no tensors."""
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([1] * len(tokens))
    if eos is not None:
        writer.add_eos_token_id(eos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
