"""Raw material → versioned, training-ready datasets.

``sources/`` yield :class:`~genloop.data.records.Record` objects; ``clean``, ``dedup``,
``pii``, ``code`` and ``images`` transform or drop them (every drop has a reason);
``tokenizer`` and ``pack`` turn text into memory-mapped token shards; ``prepare`` is the
main flow that ties them together and registers a dataset version.
"""
