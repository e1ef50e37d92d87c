"""``POST /v1/feedback``: rate a response (+1 / -1), optionally with a corrected answer.

``router.py`` (the route) → ``protocol.py`` (the request and response models) →
``serving.py`` (the handler) → the feedback store.
"""
