"""Evaluation: text, code, bias and image metrics, reports, comparison and the release gate."""
