"""Training: one readable loop (``loop.py``) for every family, with pluggable objectives,
exact-resume checkpoints and the same entry point alone or under torchrun."""
