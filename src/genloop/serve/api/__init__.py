"""The HTTP API, one endpoint family at a time, in vLLM's shape.

A generating family is a package: ``router.py`` (the route: parse, authorize, call),
``protocol.py`` (its pydantic request models: the OpenAPI schema) and ``serving.py`` (the
handler), which talks to the engine (``serve/engine/protocol.py``):

- ``completions/`` and ``chat/``: the text flow they share is ``serving_text.py`` (route
  to an upstream or lease a local version, admit, generate, answer, record); a request's
  run on the engine is ``text_run.py``;
- ``images/``: one generation at a time per image model;
- ``feedback/``: ratings of responses, into the feedback store.

What they share: ``protocol.py`` (sampling fields, seed bounds, response ids) and
``streaming.py`` (server-sent events, client disconnects). ``health.py`` and
``models.py`` are routes over the server's state with no request body; ``admin`` is the
admin API.
"""
