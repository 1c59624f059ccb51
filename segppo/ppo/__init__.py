"""PPO against dense segment-level rewards (DESIGN.md §3.4–3.5); token and bandit PPO are settings."""
