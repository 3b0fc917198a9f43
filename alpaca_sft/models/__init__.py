"""A base model and its tokenizer: where it comes from, how it loads, how it generates, and a GGUF made a folder."""
