"""Watching models in production and in training: metrics, logs, usage, drift, alerts."""
