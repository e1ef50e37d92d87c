"""Model families: build, train-time loss, save and load; presets and LoRA.

``get_family(name)`` gives a family (``causal_lm``, ``seq2seq``); the family modules import
transformers, so import them where they are needed.
"""

from genloop.models.family import Family, count_parameters, family_names, get_family

__all__ = ["Family", "count_parameters", "family_names", "get_family"]
