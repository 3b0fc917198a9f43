"""Prompts, scores and the comparison report (the generation itself is models/generation.py)."""
