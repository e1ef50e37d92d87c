"""Pipelines: stages run in order, cached by their inputs' hash, resumable."""
