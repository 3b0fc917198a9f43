"""Instruction-tuning a causal-LM base (Mistral-7B, Gemma-3-270m, ...) on Alpaca with TRL + PEFT, in the
pipeline's stages: data (records in, supervised token rows out), models (sources, loading, tokenizer,
generation, GGUF), kernels (the fast paths), train (settings, checks, the run, its checkpoints and record),
eval (prompts, scores, report) and release (pairing, merge, card, push); run_folder, below train, eval and release,
is the format of a run's output folder that the one writes and the others read."""
