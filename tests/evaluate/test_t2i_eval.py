"""The t2i suite end to end: one config trains the autoencoder and the CLIP as parts, then
the UNet over them; ``genloop eval`` draws seen and held-out prompts, judges them, scores
them with the CLIP the text encoder came from, and keeps a sample grid per prompt."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from genloop.config import EvalConfig, GenloopConfig
from genloop.errors import GenloopError
from genloop.evaluate.run import evaluate_model
from genloop.train.loop import train
from genloop.workspace import Workspace, init_workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def loop(objective: str, steps: int = 3) -> dict[str, Any]:
    return {
        "objective": objective,
        "lr": 1e-3,
        "warmup_steps": 1,
        "max_steps": steps,
        "batch_size": 16,
        "eval_every": 100,
        "eval_batches": 1,
        "checkpoint_every": 100,
    }


SHAPES_T2I = {
    "name": "shapes-t2i",
    "data": {
        "name": "shapes",
        "kind": "images",
        "sources": [{"type": "builtin", "name": "shapes", "count": 200, "size": 32}],
        "images": {"size": 32, "channels": 3},
        "split": {"val": 0.1, "test": 0.1},
        "workers": 1,
    },
    "tokenizer": {"vocab_size": 320},
    "parts": {
        "ae": {
            "model": {"family": "autoencoder_kl", "base_channels": 8},
            "train": loop("autoencoder_kl"),
        },
        "clip": {
            "model": {
                "family": "clip",
                "clip": {
                    "patch_size": 8,
                    "vision_hidden": 32,
                    "vision_layers": 1,
                    "text_hidden": 32,
                    "text_layers": 1,
                    "heads": 2,
                    "projection_dim": 32,
                    "max_text_length": 32,
                },
            },
            "train": loop("contrastive"),
        },
    },
    "model": {
        "family": "text_to_image",
        "base_channels": 16,
        "diffusion": {"latent_vae": "part:ae", "text_encoder": "part:clip", "sample_steps": 2},
    },
    "train": loop("text_to_image"),
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    workspace = init_workspace(tmp_path_factory.mktemp("t2i-eval") / "ws")
    seed_a_quick_judge(workspace)
    yield workspace
    workspace.close()


def seed_a_quick_judge(ws: Workspace) -> None:
    """The judge the suite loads from the workspace, trained briefly (the real one takes
    half a minute; what it says is not what this test checks)."""
    from genloop.evaluate import compositional as c
    from genloop.models.image_io import save_module_dir

    judge = c.train_judge(32, n=400, steps=5)
    with ws.store.writer(c.store_key(32)) as staging:
        save_module_dir(judge, staging / "model", c.FORMAT, judge.config)
        (staging / c.META_FILE).write_text(json.dumps({"kind": "shapes-judge"}), "utf-8")


def test_the_parts_train_and_the_t2i_suite_scores_seen_and_held_out_prompts(
    ws: Workspace,
) -> None:
    result = train(ws, GenloopConfig.model_validate(SHAPES_T2I))
    assert result.model is not None
    lineage = result.model.config["model"]
    assert (lineage["latent_vae"], lineage["text_encoder"]) == (
        "shapes-t2i-ae@1",
        "shapes-t2i-clip@1",
    )

    cfg = EvalConfig(t2i_prompts=3, t2i_images_per_prompt=2, t2i_steps=2)
    record = evaluate_model(ws, result.model.ref, cfg=cfg)  # the t2i suite by default
    m = record.metrics
    for group in ("seen", "held_out"):
        assert 0.0 <= m[f"compositional_accuracy_{group}"] <= 1.0
        assert 0.0 <= m[f"clip_score_{group}"] <= 100.0
        for attribute in ("colour", "shape", "size", "position"):
            assert f"{attribute}_accuracy_{group}" in m
    assert m["fid_clip"] >= 0.0
    assert record.report is not None
    folder = ws.store.open_verified(record.report)
    stored = json.loads((folder / "results.json").read_text())
    (suite,) = stored["suites"]
    assert suite["suite"] == "t2i" and suite["settings"]["prompts"] == {"seen": 3, "held_out": 3}
    assert len(suite["per_sample"]["compositional_accuracy_held_out"]) == 6  # 3 prompts × 2
    grids = sorted(p.name for p in (folder / "figures").iterdir())
    assert grids == [f"t2i-{i:03d}.png" for i in range(6)]  # a grid per prompt
    assert "held_out: a " in (folder / "report.html").read_text()

    # the metrics are the model's, so the release gate can use them
    from genloop.workspace import registry

    assert "compositional_accuracy_held_out" in registry.resolve(ws, result.model.ref).metrics

    with pytest.raises(GenloopError, match="the image suite is for the vae, gan, diffusion"):
        evaluate_model(ws, result.model.ref, suites=["image"])
    with pytest.raises(GenloopError, match=r"is not a clip model \(autoencoder_kl\)"):
        evaluate_model(
            ws, result.model.ref, cfg=cfg.model_copy(update={"clip_model": "shapes-t2i-ae"})
        )
