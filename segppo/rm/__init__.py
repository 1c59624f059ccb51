"""Reward-model training, evaluation and inspection (DESIGN.md §3.1–3.2)."""
