"""``POST /v1/completions``: continue a prompt (OpenAI's legacy completions API).

``router.py`` (the route) → ``protocol.py`` (the request model) → ``serving.py`` (the
handler) → the engine, through ``serving_text.serve_text``.
"""
