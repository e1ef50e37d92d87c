"""Deployment optimization: quantization, pruning, distillation, ONNX export, trade-offs.

``run.optimize_model`` is the main flow (``genloop optimize``); each transform lives in its
own module (``quantize``, ``prune``, ``distill``, ``onnx``) and ``tradeoff`` measures the
variants side by side. ``variant`` reads what an optimized model directory holds; the
family loader calls it, so quantized variants load wherever a model is loaded.
"""
