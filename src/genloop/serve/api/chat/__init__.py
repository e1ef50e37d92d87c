"""``POST /v1/chat/completions``: answer a conversation, through the model's chat template.

``router.py`` (the route) → ``protocol.py`` (the request models) → ``serving.py`` (the
handler) → the engine, through ``serving_text.serve_text``; a captioning model's answer
goes through ``vision.py`` (image parts in, captions out) instead.
"""
