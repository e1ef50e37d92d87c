"""Security boundaries: keys, encryption, safe loading, guardrails, PII detection, privacy."""
