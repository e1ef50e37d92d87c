"""The one C extension, genloop/data/_bpe.c (see genloop/data/tokenizer.py); the rest of the
package is described in pyproject.toml. Optional: where it cannot be compiled, the
tokenizer's pure-Python path gives the same ids, more slowly."""

from setuptools import Extension, setup

setup(
    ext_modules=[Extension("genloop.data._bpe", ["src/genloop/data/_bpe.c"], optional=True)],
)
