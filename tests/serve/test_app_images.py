"""``POST /v1/images/generations`` with a tiny class-conditional VAE (random weights)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from genloop.workspace import Workspace, registry

from .conftest import LiveServer, make_keys, running_server, serve_config, tiny_text_to_image


@pytest.fixture(scope="module")
def server(module_ws: Workspace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    import torch

    from genloop.models.family import get_family

    torch.manual_seed(0)
    family = get_family("vae")
    model = family.build(
        {
            "image_size": 8,
            "channels": 1,
            "latent_dim": 4,
            "base_channels": 4,
            "num_classes": 3,
            "class_names": ["zero", "one", "two"],
        }
    )
    src = family.save(model, tmp_path_factory.mktemp("vae") / "m")
    registry.register_model(module_ws, "digits", "vae", Path(src))
    t2i = tiny_text_to_image(tmp_path_factory.mktemp("t2i"))
    registry.register_model(module_ws, "shapes", "text_to_image", t2i)
    cfg = serve_config(models=["tiny@production", "digits", "shapes"], max_n=4)
    with running_server(module_ws, cfg, make_keys(module_ws)) as s:
        yield s


def decode(item: dict[str, str]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def test_images_are_png_of_the_asked_size_and_repeat_with_a_seed(server: LiveServer) -> None:
    with server.client(server.keys["client"]) as c:
        body = {"model": "digits", "prompt": "two", "n": 3, "seed": 11}
        r = c.post("/v1/images/generations", json=body)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert len(data) == 3 and r.json()["model"] == "digits@1"
        images = [decode(d) for d in data]
        assert all(im.format == "PNG" and im.size == (8, 8) for im in images)
        again = c.post("/v1/images/generations", json=body).json()["data"]
        assert again == data
        other = c.post("/v1/images/generations", json=body | {"seed": 12}).json()["data"]
        assert other != data
        big = c.post("/v1/images/generations", json=body | {"size": "32x24", "n": 1}).json()
        assert decode(big["data"][0]).size == (32, 24)


def test_image_requests_are_checked(server: LiveServer) -> None:
    with server.client(server.keys["client"]) as c:
        cases = [
            ({"prompt": "seven"}, 400, None),  # not one of the model's classes
            ({"n": 5}, 400, "n"),
            ({"size": "4096x4096"}, 400, "size"),
            ({"size": "big"}, 400, "size"),
            ({"response_format": "url"}, 400, "response_format"),
            ({"model": "tiny@production"}, 400, "model"),  # a text model
            ({"negative_prompt": "blurry"}, 400, None),  # a text-to-image option
            ({"guidance_scale": 3.0, "num_inference_steps": 10}, 400, None),
            ({"num_inference_steps": 0}, 400, "num_inference_steps"),
        ]
        for extra, status, param in cases:
            r = c.post("/v1/images/generations", json={"model": "digits", "prompt": "one"} | extra)
            assert r.status_code == status, (extra, r.text)
            if param:
                assert r.json()["error"]["param"] == param, (extra, r.text)
            if "guidance_scale" in extra:  # refused by name, not silently ignored
                message = r.json()["error"]["message"]
                assert "num_inference_steps, guidance_scale" in message, message
                assert "only text-to-image models" in message, message
        r = c.post("/v1/completions", json={"model": "digits", "prompt": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        models = {m["id"]: m["kind"] for m in c.get("/v1/models").json()["data"]}
        assert models == {"tiny@production": "text", "digits": "image", "shapes": "image"}


def test_a_text_to_image_model_draws_sentences(server: LiveServer) -> None:
    body = {
        "model": "shapes",
        "prompt": "a red circle on the left",
        "n": 2,
        "seed": 5,
        "negative_prompt": "a blue square",
        "num_inference_steps": 2,
        "guidance_scale": 3.0,
    }
    with server.client(server.keys["client"]) as c:
        r = c.post("/v1/images/generations", json=body)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        images = [decode(d) for d in data]
        assert [(im.mode, im.size) for im in images] == [("RGB", (32, 32))] * 2
        assert "warnings" not in r.json()
        assert c.post("/v1/images/generations", json=body).json()["data"] == data  # seeded
        other = c.post("/v1/images/generations", json=body | {"prompt": "a blue square"})
        assert other.json()["data"] != data  # the sentence conditions the images
        # a prompt past the text encoder's 16 positions is cut, and the response says so
        long = body | {"prompt": " ".join(["a red circle on the left"] * 6), "n": 1}
        r = c.post("/v1/images/generations", json=long)
        assert r.status_code == 200, r.text
        (warning,) = r.json()["warnings"]
        assert "the text encoder reads 16" in warning
        strict = server.state.cfg.serve
        strict.long_image_prompts = "refuse"  # by configuration: refused instead
        try:
            r = c.post("/v1/images/generations", json=long)
        finally:
            strict.long_image_prompts = "truncate"
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert "refuses prompts that long" in r.json()["error"]["message"]
        bad = c.post("/v1/images/generations", json=body | {"num_inference_steps": 1000})
        assert bad.status_code == 400 and "steps must be between" in bad.json()["error"]["message"]
