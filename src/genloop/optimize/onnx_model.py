"""An ONNX variant as a transformers model, so that evaluation runs it like any other.

:class:`OnnxForCausalLM` is a ``PreTrainedModel`` with ``GenerationMixin`` whose forward
runs the exported graph in onnxruntime (:class:`genloop.optimize.onnx.OnnxCausalLM`):
``model(input_ids=..., attention_mask=...)`` gives fp32 logits, and ``generate`` works
unchanged: greedy, sampling, beam search and left-padded batches. The cache between steps
is a ``DynamicCache`` rebuilt from the graph's ``present`` outputs, so ``generate``'s own
bookkeeping (beam reordering included) applies to it. Greedy and beam outputs equal the
parent PyTorch model's (``tests/optimize/test_onnx.py``).

``genloop eval`` (and everything built on it: the pipeline's register and gate stages, the
retrain gate) loads ONNX variants through :func:`load_onnx_model`. It has no trainable
weights (one frozen anchor parameter tells ``generate`` the device), so training and
fine-tuning refuse it where they load models (``load_pretrained``). The serving engine
does not use it: it has its own batched onnxruntime runner (``serve/engine/onnx_runner``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genloop.optimize.onnx import OnnxCausalLM, load_onnx_lm


def _cache_field() -> str:
    """The output's cache field: ``cache`` since transformers renamed ``past_key_values``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _model_class() -> type[Any]:
    """The class, built on first use (transformers is slow to import)."""
    from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    _CACHE_FIELD = _cache_field()

    class OnnxForCausalLM(PreTrainedModel, GenerationMixin):  # type: ignore[no-untyped-call]
        """A causal LM exported to ONNX, run by onnxruntime behind transformers' API."""

        config_class = PretrainedConfig
        main_input_name = "input_ids"

        def __init__(self, config: PretrainedConfig, lm: OnnxCausalLM) -> None:
            super().__init__(config)
            self.lm = lm
            # generate() reads the device off the parameters; this one is never used
            self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)

        def forward(
            self,
            input_ids: Tensor,
            attention_mask: Tensor | None = None,
            position_ids: Tensor | None = None,
            cache: Any = None,
            use_cache: bool | None = True,
            **kwargs: Any,
        ) -> CausalLMOutputWithPast:
            # transformers ≥ 5.2x passes the cache as ``cache``; older releases as
            # ``past_key_values`` (still accepted, renamed, until 5.40)
            cache = kwargs.pop("past_key_values", None) if cache is None else cache
            past = None
            if cache is not None and cache.get_seq_length() > 0:
                past = tuple((layer.keys, layer.values) for layer in cache.layers)
            logits, present = self.lm.forward(input_ids, attention_mask, position_ids, past)
            new_cache = None
            if use_cache:
                new_cache = DynamicCache(config=self.config)
                for i, (k, v) in enumerate(present):
                    new_cache.update(k, v, i)
            outputs: dict[str, Any] = {"logits": logits, _CACHE_FIELD: new_cache}
            return CausalLMOutputWithPast(**outputs)

    return OnnxForCausalLM


def load_onnx_model(model_dir: Path, *, device: str = "cpu", threads: int | None = None) -> Any:
    """The ONNX variant in ``model_dir`` as an ``OnnxForCausalLM`` in eval mode, its
    ``config.json`` and ``generation_config.json`` loaded (never downloaded)."""
    from transformers import AutoConfig, GenerationConfig

    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    model = _model_class()(config, load_onnx_lm(model_dir, device=device, threads=threads))
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    return model.eval()
