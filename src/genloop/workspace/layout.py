"""File names in a model version's directory that several layers read or write.

A model version is a directory: Hugging Face files
(``config.json``, weights, tokenizer files), ``genloop.json`` (family, lineage, metrics;
an optimized variant records its transform there under ``"optimize"``) and
``MANIFEST.sha256`` (:mod:`genloop.workspace.manifest`).
"""

from __future__ import annotations

GENLOOP_JSON = "genloop.json"
SAFETENSORS = "model.safetensors"  # the weights in one file (shards come with an index)
ONNX_FILE = "model.onnx"  # an ONNX variant's graph; its weights beside it (model.onnx.*)
# a quantized variant's weights again as a compressed-tensors checkpoint (transformers, vLLM)
COMPRESSED_DIR = "compressed-tensors"
