"""Backbones, the per-token scalar reward head, and save/load with segppo.json."""
