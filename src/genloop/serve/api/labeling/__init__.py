"""``/v1/label``: the labeling queue for annotators (scope ``label``; ``admin`` implies it).

``router.py`` (the routes) → ``protocol.py`` (request models) → the labeling library
(``genloop.feedback.labeling``). The annotator is the API key's identity (its user id,
else its name), never a name the client sends, so one key cannot label as another person.
"""
