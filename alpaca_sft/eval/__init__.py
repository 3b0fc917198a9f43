"""Prompts, greedy generation, scores and the comparison report."""
