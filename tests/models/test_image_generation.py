"""Loading any image model directory and generating from a prompt; PNG files and grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from genloop.errors import GenloopError
from genloop.models.family import get_family
from genloop.models.image_generation import load_image_generator, save_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIGITS = [str(i) for i in range(10)]
BASE = {"image_size": 8, "channels": 1, "base_channels": 8}
CONFIGS = {
    "vae": {"latent_dim": 4},
    "gan": {"latent_dim": 4},
    "diffusion": {"timesteps": 20, "sample_steps": 3},
}


def saved(tmp_path: Path, family: str, classes: list[str] | None = DIGITS) -> Path:
    torch.manual_seed(0)
    config = {**BASE, **CONFIGS[family]}
    if classes is not None:
        config |= {"num_classes": len(classes), "class_names": classes}
    model = get_family(family).build(config)
    return get_family(family).save(model, tmp_path / family)


@pytest.mark.parametrize("family", ["vae", "gan", "diffusion"])
def test_every_family_generates_the_prompted_class_reproducibly(
    tmp_path: Path, family: str
) -> None:
    gen = load_image_generator(saved(tmp_path, family))
    assert gen.family == family and gen.class_names == DIGITS and gen.conditional
    images = gen.generate("7", n=4, seed=0)
    assert len(images) == 4 and all(im.size == (8, 8) and im.mode == "L" for im in images)
    again = gen.generate("7", n=4, seed=0)
    assert [im.tobytes() for im in images] == [im.tobytes() for im in again]
    other = gen.generate("7", n=4, seed=1)
    assert [im.tobytes() for im in images] != [im.tobytes() for im in other]
    # the same as sampling label 7 directly from the model with that seed
    direct = gen.sample([7] * 4, 4, seed=0)
    assert direct.dtype == torch.uint8
    assert [bytes(d[0].numpy().tobytes()) for d in direct] == [im.tobytes() for im in images]


def test_prompts_name_classes_exactly_or_case_insensitively(tmp_path: Path) -> None:
    gen = load_image_generator(saved(tmp_path, "vae", ["Cat", "dog"]))
    assert gen.label("Cat") == 0 and gen.label(" cat ") == 0 and gen.label("DOG") == 1
    assert gen.labels_for(None, 5) == [0, 1, 0, 1, 0]  # no prompt: every class in turn
    assert gen.label("") is None
    with pytest.raises(GenloopError, match="unknown class 'bird'; this model knows: Cat, dog"):
        gen.generate("bird")
    with pytest.raises(GenloopError, match="n must be between 1 and 1024"):
        gen.generate("cat", n=0)
    with pytest.raises(GenloopError, match="longer than 200"):
        gen.generate("x" * 201)


def test_an_unconditional_model_takes_no_prompt(tmp_path: Path) -> None:
    gen = load_image_generator(saved(tmp_path, "gan", classes=None))
    assert not gen.conditional and gen.class_names == []
    assert len(gen.generate(None, n=3, seed=2)) == 3
    with pytest.raises(GenloopError, match="unconditional: it takes no prompt"):
        gen.generate("7")


def test_save_images_writes_pngs_and_a_grid(tmp_path: Path) -> None:
    gen = load_image_generator(saved(tmp_path, "vae"))
    images = gen.generate(None, n=10, seed=0)
    paths = save_images(images, tmp_path / "out")
    assert [p.name for p in paths] == [f"{i:03d}.png" for i in range(10)] + ["grid.png"]
    with Image.open(paths[3]) as im:
        assert im.size == (8, 8) and im.tobytes() == images[3].tobytes()
    with Image.open(paths[-1]) as grid:  # 4 × 3 cells of 64 px (8 px × 8) and 1 px gaps
        assert grid.size == (4 * 65 + 1, 3 * 65 + 1)
    with pytest.raises(GenloopError, match="no images"):
        save_images([], tmp_path / "empty")


def test_loading_checks_what_the_directory_holds(tmp_path: Path) -> None:
    with pytest.raises(GenloopError, match="does not exist"):
        load_image_generator(tmp_path / "absent")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(GenloopError, match="not an image model"):
        load_image_generator(tmp_path / "text")
    model_dir = saved(tmp_path, "gan")
    (model_dir / "genloop.json").write_text(json.dumps({"family": "vae"}))
    with pytest.raises(GenloopError, match=r"genloop\.json says vae"):
        load_image_generator(model_dir)


def test_a_tampered_registered_artifact_is_refused(tmp_path: Path) -> None:
    from genloop.errors import IntegrityError
    from genloop.workspace.manifest import write_manifest

    model_dir = saved(tmp_path, "vae")
    write_manifest(model_dir)
    load_image_generator(model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(IntegrityError):
        load_image_generator(model_dir)
