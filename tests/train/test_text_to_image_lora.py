"""LoRA fine-tuning of an imported Stable Diffusion pipeline on a captioned image folder.

A tiny random pipeline saved by diffusers is imported (``genloop models import``), then
trained for a few steps in the real loop with ``model.base_model`` + ``model.lora`` on 16
images described by a metadata.jsonl (Hugging Face imagefolder). Only the adapters on the
UNet's attention projections train; the registered version is a plain pipeline folder
(adapters merged) that diffusers loads and draws the same images from as genloop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from genloop.config import GenloopConfig
from genloop.models.importer import import_checkpoint
from genloop.models.text_to_image import load_text_to_image
from genloop.train.loop import train
from genloop.workspace import Workspace, init_workspace, registry

from ..models.test_import_diffusers import build_source

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def captioned_folder(root: Path) -> Path:
    """16 drawn 16×16 shapes and a metadata.jsonl with their captions."""
    from PIL import Image

    from genloop.data.shapes import Scene, ShapeObject, render

    folder = root / "captioned"
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    combos = [
        (c, s, p)
        for c in ("red", "green", "blue")
        for s in ("circle", "square")
        for p in ("left", "right")
    ]
    for i in range(16):
        colour, shape, pos = combos[i % len(combos)]
        scene = Scene((ShapeObject(colour, shape, "large", pos),))
        Image.fromarray(render(scene, size=16, rng=rng)).save(folder / f"{i:02d}.png")
        lines.append(
            json.dumps({"file_name": f"{i:02d}.png", "text": f"a {colour} {shape} on the {pos}"})
        )
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora")
    ws = init_workspace(root / "ws")
    base = import_checkpoint(ws, build_source(root), name="tiny-sd")
    cfg = GenloopConfig.model_validate(
        {
            "name": "tiny-sd-lora",
            "data": {
                "name": "captioned",
                "kind": "images",
                "sources": [{"type": "images", "path": str(captioned_folder(root))}],
                "images": {"size": 16, "channels": 3},
                "split": {"val": 0.25, "test": 0.0},
                "workers": 1,
            },
            "tokenizer": {"vocab_size": 300},
            "model": {
                "family": "text_to_image",
                "base_model": base.ref,
                "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0},
            },
            "train": {
                "objective": "text_to_image",
                "lr": 5e-2,
                "warmup_steps": 0,
                "weight_decay": 0.0,
                "max_steps": 6,
                "batch_size": 4,
                "eval_every": 6,
                "eval_batches": 1,
                "checkpoint_every": 100,
                "seed": 0,
                "device": "cpu",
            },
        }
    )
    result = train(ws, cfg)
    return {"ws": ws, "base": base, "result": result}


def _weights(ws: Workspace, info: Any, part: str) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return load_file(str(ws.store.path(info.artifact) / part / name))


def test_only_the_unet_attention_projections_change(tuned: dict[str, Any]) -> None:
    ws, base, tuned_info = tuned["ws"], tuned["base"], tuned["result"].model
    assert tuned_info.family == "text_to_image" and tuned_info.parent == base.ref
    assert tuned_info.config["base_model"] == base.ref and tuned_info.config["lora"]["r"] == 4
    for part in ("vae", "text_encoder"):
        a, b = _weights(ws, base, part), _weights(ws, tuned_info, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = _weights(ws, base, "unet"), _weights(ws, tuned_info, "unet")
    assert a.keys() == b.keys()  # merged: no adapter tensors left
    changed = sorted(k for k in a if not torch.equal(a[k], b[k]))
    targeted = sorted(
        k for k in a if k.endswith(".weight") and k.removesuffix(".weight").endswith(TARGETS)
    )
    assert changed == targeted and len(changed) == 32  # 8 attention layers × 4 projections


def test_the_lora_parameters_are_the_only_trainable_ones(tuned: dict[str, Any]) -> None:
    from genloop.models.text_to_image_lora import LoraTextToImage, lora_parameters

    ws, base = tuned["ws"], tuned["base"]
    model = LoraTextToImage(load_text_to_image(ws.store.path(base.artifact)), r=4, alpha=8.0)
    names = lora_parameters(model)
    assert len(names) == 2 * 32 and all(".lora_A." in n or ".lora_B." in n for n in names)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert 0 < trainable < total // 20


def test_the_tuned_pipeline_draws_differently_and_diffusers_loads_it(
    tuned: dict[str, Any],
) -> None:
    import diffusers

    ws, base, tuned_info = tuned["ws"], tuned["base"], tuned["result"].model
    prompt = ["a red circle on the left"]
    before = load_text_to_image(ws.store.path(base.artifact)).generate(prompt, seed=4, steps=3)
    ours = load_text_to_image(ws.store.path(tuned_info.artifact))
    after = ours.generate(prompt, seed=4, steps=3)
    assert (before.float() - after.float()).abs().mean() > 1.0
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(ws.store.path(tuned_info.artifact))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt, output_type="np", generator=torch.Generator().manual_seed(4), num_inference_steps=3
    ).images
    theirs = (np.asarray(out) * 255).round().astype(np.uint8)
    diff = np.abs(after.permute(0, 2, 3, 1).numpy().astype(int) - theirs.astype(int))
    assert diff.max() <= 1
    assert registry.resolve(ws, "tiny-sd-lora").version == 1
