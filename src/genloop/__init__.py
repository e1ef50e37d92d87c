"""genloop: run the whole life of a generative model.

The package is organised after the loop: ``data`` → ``train`` → ``evaluate`` → ``tune``
→ ``optimize`` → ``serve`` → ``monitor`` → ``feedback``, around a ``workspace`` (catalog
database + artifact store). Heavy libraries (torch, transformers) are imported inside the
functions that need them, so importing genloop and ``genloop --help`` stay fast.
"""

__version__ = "0.1.0"
