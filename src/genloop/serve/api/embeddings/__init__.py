"""``POST /v1/embeddings``: sentence embeddings from an embedding model (``masked_lm``).

``router.py`` (the route) → ``protocol.py`` (the request model) → ``serving.py`` (the
handler) → the model's embedding engine (``serve/engine/embedder.py``), which batches
concurrent requests into shared forward passes.
"""
