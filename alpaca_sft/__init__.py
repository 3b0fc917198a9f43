"""Instruction-tuning Mistral-7B on Alpaca with TRL + PEFT, in the pipeline's stages:
data (records in, supervised token rows out), train (settings, model, the run and its record),
eval (prompts, generation, scores, report) and release (pairing, merge, card, push)."""
