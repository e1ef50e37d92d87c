"""LoRA (Hu et al., 2021) on a ``text_to_image`` pipeline's UNet, through peft.

Fine-tuning a pipeline (one genloop trained, or an imported Stable Diffusion) on a few
captioned images: every weight is frozen, and the UNet's attention projections (``to_q``,
``to_k``, ``to_v``, ``to_out.0`` of its self- and cross-attention layers, by default) learn
ΔW = (α/r)·B·A, B starting at zero so training starts from the base pipeline. The
adapters go in with diffusers' own peft integration (``UNet2DConditionModel.add_adapter``),
so the UNet stays a UNet2DConditionModel and the pipeline's sampler runs it unchanged.

:class:`LoraTextToImage` is what the training loop holds. Like a ``peft.PeftModel`` it has
``peft_config`` and ``merge_and_unload()``, so the loop's export (``merge_lora``) folds the
adapters into the UNet's weights and saves a plain pipeline folder that diffusers and
genloop load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from genloop.errors import ConfigError, GenloopError
from genloop.models.text_to_image import TextToImage

DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoraTextToImage(nn.Module):
    """A :class:`TextToImage` whose UNet carries LoRA adapters; only they train.

    ``forward`` is the pipeline's training loss (same arguments), so the objective and
    DDP use it as they use the plain pipeline.
    """

    def __init__(
        self,
        pipeline: TextToImage,
        *,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: Sequence[str] | None = None,
    ) -> None:
        from peft import LoraConfig

        super().__init__()
        if getattr(pipeline.unet, "peft_config", None):
            raise GenloopError("this pipeline's UNet already has LoRA adapters")
        prediction = pipeline.schedule.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ConfigError(
                f"the base pipeline's UNet predicts {prediction!r}; genloop fine-tunes "
                "ε-prediction (epsilon) pipelines only"
            )
        targets = list(target_modules) if target_modules is not None else list(DEFAULT_UNET_TARGETS)
        pipeline.requires_grad_(False)
        try:
            pipeline.unet.add_adapter(
                LoraConfig(
                    r=r,
                    lora_alpha=alpha,  # type: ignore[arg-type]  # peft says int; scale = alpha / r
                    lora_dropout=dropout,
                    target_modules=targets,
                    init_lora_weights=True,  # B = 0: the adapted UNet starts equal to the base
                    bias="none",
                )
            )
        except ValueError as exc:
            linear = sorted(
                {
                    n.split(".")[-1]
                    for n, m in pipeline.unet.named_modules()
                    if isinstance(m, nn.Linear)
                }
            )
            raise ConfigError(
                f"cannot place LoRA adapters on the UNet: {str(exc).splitlines()[0]} (its "
                f"linear layers are named: {', '.join(linear)})"
            ) from None
        self.pipeline = pipeline

    @property
    def peft_config(self) -> dict[str, Any]:
        config: dict[str, Any] = self.pipeline.unet.peft_config
        return config

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        out: Tensor = self.pipeline(*args, **kwargs)
        return out

    def merge_and_unload(self) -> TextToImage:
        """Fold W + (α/r)·B·A into the UNet's weights, drop the adapter layers, and return
        the plain pipeline."""
        unet = self.pipeline.unet
        unet.fuse_lora()
        unet.unload_lora()
        return self.pipeline


def lora_parameters(model: nn.Module) -> list[str]:
    """The names of the parameters that train (the adapters' A and B)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def base_pipeline(model: nn.Module) -> nn.Module:
    """The pipeline a LoRA wrapper adapts, or ``model`` itself."""
    return model.pipeline if isinstance(model, LoraTextToImage) else model
