"""Security boundaries: keys, encryption, safe loading, guardrails, privacy, paths."""
