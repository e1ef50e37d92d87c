"""Serving: an OpenAI-compatible HTTP server (``app.py``) in front of in-process engines
(``engine/``) and upstream servers (``upstream.py``)."""
