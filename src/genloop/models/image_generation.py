"""Generate images from any image model version (VAE, GAN, diffusion): the one function
``genloop generate``, ``POST /v1/images/generations``, evaluation and augmentation share.

    gen = load_image_generator(model_dir)          # a verified artifact directory
    images = gen.generate("7", n=16, seed=0)       # PIL images; the same seed, the same images
    save_images(images, out_dir)                   # 000.png … 015.png + grid.png

A prompt is a class name of a class-conditional model (``"7"`` for the digits, ``"cat"``
for a folder dataset), matched exactly, then case-insensitively; anything else is a
:class:`GenloopError` that lists the classes. No prompt on a conditional model cycles
through the classes (0, 1, 2, …), so a grid shows every one; an unconditional model takes
no prompt. Randomness comes only from a generator seeded by ``seed``; the model is only
read, so one generator can serve several threads.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genloop.errors import GenloopError

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image as PILImage
    from torch import Tensor, nn

    from genloop.models.text_to_image import TextToImage

MAX_IMAGES = 1024  # per call
MAX_PROMPT_CHARS = 200
GRID_CELL_PX = 64  # grid.png enlarges small images (nearest neighbour) to about this size


def detect_family(model_dir: Path) -> str:
    """``vae``, ``gan``, ``diffusion``, ``text_to_image`` or ``autoencoder_kl``, from the
    artifact's files."""
    from genloop.models.autoencoder_kl import SETTINGS_FILE as AUTOENCODER_SETTINGS
    from genloop.models.diffusion import SETTINGS_FILE
    from genloop.models.text_to_image import SETTINGS_FILE as TEXT_TO_IMAGE_SETTINGS

    if (model_dir / SETTINGS_FILE).is_file():
        return "diffusion"
    if (model_dir / TEXT_TO_IMAGE_SETTINGS).is_file():
        return "text_to_image"
    if (model_dir / AUTOENCODER_SETTINGS).is_file():
        return "autoencoder_kl"
    config = model_dir / "config.json"
    if config.is_file():
        try:
            fmt = json.loads(config.read_text(encoding="utf-8")).get("format")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            fmt = None
        if fmt == "genloop-vae":
            return "vae"
        if fmt == "genloop-gan":
            return "gan"
    raise GenloopError(f"{model_dir} is not an image model (vae, gan or diffusion) directory")


@dataclass
class ImageGenerator:
    """A loaded image model and what callers need to know about it."""

    model: nn.Module  # ConvVAE, DCGAN or DiffusionModel, in eval mode
    family: str
    class_names: list[str]  # empty: unconditional
    image_size: int
    channels: int

    @property
    def conditional(self) -> bool:
        return bool(self.class_names)

    def label(self, prompt: str | None) -> int | None:
        """The class id a prompt names; None for no prompt (or an empty one)."""
        if prompt is None or not prompt.strip():
            return None
        text = prompt.strip()
        if len(text) > MAX_PROMPT_CHARS:
            raise GenloopError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
        if not self.conditional:
            raise GenloopError(
                f"this {self.family} model is unconditional: it takes no prompt (got {text!r})"
            )
        if text in self.class_names:
            return self.class_names.index(text)
        folded = [c.casefold() for c in self.class_names]
        if text.casefold() in folded:
            return folded.index(text.casefold())
        shown = ", ".join(self.class_names[:30]) + (" …" if len(self.class_names) > 30 else "")
        raise GenloopError(f"unknown class {text!r}; this model knows: {shown}")

    def labels_for(self, prompt: str | None, n: int) -> list[int] | None:
        """One label per image: the prompt's class, or every class in turn without one."""
        label = self.label(prompt)
        if not self.conditional:
            return None
        if label is None:
            return [i % len(self.class_names) for i in range(n)]
        return [label] * n

    def sample(self, labels: list[int] | None, n: int, seed: int, batch_size: int = 256) -> Tensor:
        """``n`` images as uint8 (n, C, H, W), generated in batches from one seeded
        generator (the same seed and labels give the same images)."""
        import torch

        from genloop.data.images import to_uint8

        if labels is not None and len(labels) != n:
            raise GenloopError(f"{len(labels)} labels for {n} images")
        generator = torch.Generator().manual_seed(seed)
        out = []
        with torch.inference_mode():
            for i in range(0, n, batch_size):
                m = min(batch_size, n - i)
                ys = None if labels is None else torch.tensor(labels[i : i + m], dtype=torch.long)
                images = self.model.sample(ys, m, generator)  # type: ignore[operator]
                out.append(to_uint8(images.float().cpu()))
        if not out:
            return torch.zeros(
                0, self.channels, self.image_size, self.image_size, dtype=torch.uint8
            )
        return torch.cat(out)

    def prompt_warnings(self, prompt: str | None) -> list[str]:
        """What the response should tell about the prompt (nothing: a class name is whole)."""
        return []

    def generate(
        self,
        prompt: str | None = None,
        n: int = 1,
        seed: int | None = None,
        *,
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> list[PILImage]:
        """``n`` PIL images (mode L or RGB) for ``prompt``; ``seed`` None draws one.
        ``negative_prompt``, ``steps`` and ``guidance_scale`` are text-to-image options:
        given here, they are refused rather than ignored."""
        given = {
            "negative_prompt": negative_prompt,
            "num_inference_steps": steps,
            "guidance_scale": guidance_scale,
        }
        extras = [name for name, value in given.items() if value is not None]
        if extras:
            raise GenloopError(
                f"{', '.join(extras)}: only text-to-image models take "
                f"{'this option' if len(extras) == 1 else 'these options'} "
                f"(this is a {self.family} model)"
            )
        if not 1 <= n <= MAX_IMAGES:
            raise GenloopError(f"n must be between 1 and {MAX_IMAGES}, not {n}")
        if seed is None:
            seed = secrets.randbits(63)
        elif not 0 <= seed < 2**63:
            raise GenloopError(f"seed must be between 0 and 2^63 - 1, not {seed}")
        labels = self.labels_for(prompt, n)
        return to_pil(self.sample(labels, n, seed))


@dataclass
class TextToImageGenerator:
    """A ``text_to_image`` pipeline behind the image generators' interface (the server's
    ``/v1/images/generations``, ``genloop generate``): the prompt is a sentence."""

    model: TextToImage
    family: str = "text_to_image"
    channels: int = 3

    @property
    def image_size(self) -> int:
        return int(self.model.image_size)

    def prompt_warnings(self, prompt: str | None) -> list[str]:
        """A note when the prompt is longer than the text encoder's context (it is cut)."""
        return self.model.truncations([prompt]) if prompt else []

    def generate(
        self,
        prompt: str | None = None,
        n: int = 1,
        seed: int | None = None,
        *,
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> list[PILImage]:
        """``n`` RGB images of ``prompt`` (no prompt: unconditional samples)."""
        images = self.model.generate(
            [prompt or ""],
            negative_prompts=None if negative_prompt is None else [negative_prompt],
            n=n,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
        )
        return to_pil(images)


def load_generator(
    model_dir: str | Path, *, device: str | torch.device = "cpu"
) -> ImageGenerator | TextToImageGenerator:
    """Whatever image model is in ``model_dir``, ready to draw from a prompt: a class name
    (or none) for vae, gan and diffusion models, a sentence for text_to_image ones."""
    model_dir = Path(model_dir)
    if model_dir.is_dir() and detect_family(model_dir) == "text_to_image":
        from genloop.models.text_to_image import load_text_to_image

        return TextToImageGenerator(load_text_to_image(model_dir, device=device))
    return load_image_generator(model_dir, device=device)


def load_image_generator(
    model_dir: str | Path, *, device: str | torch.device = "cpu"
) -> ImageGenerator:
    """Load the image model in ``model_dir`` (a model version's artifact directory, or a
    directory a family's ``save`` wrote); its manifest, when present, is verified."""
    from genloop.models.family import get_family
    from genloop.models.image_io import class_names_of

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        from genloop.errors import NotFoundError

        raise NotFoundError(f"model directory {model_dir} does not exist")
    family = detect_family(model_dir)
    recorded = _recorded_family(model_dir)
    if recorded is not None and recorded != family:
        raise GenloopError(f"{model_dir}: genloop.json says {recorded}, the files hold a {family}")
    if family == "text_to_image":
        raise GenloopError(f"{model_dir} holds a text_to_image pipeline: use load_generator")
    model = get_family(family).load(model_dir, device=device)
    model.eval().requires_grad_(False)
    config: dict[str, Any] = dict(getattr(model, "config", {}))
    return ImageGenerator(
        model=model,
        family=family,
        class_names=class_names_of(config),
        image_size=int(config["image_size"]),
        channels=int(config["channels"]),
    )


def _recorded_family(model_dir: Path) -> str | None:
    path = model_dir / "genloop.json"
    if not path.is_file():
        return None
    try:
        family = json.loads(path.read_text(encoding="utf-8")).get("family")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return family if isinstance(family, str) else None


def to_pil(images: Tensor) -> list[PILImage]:
    """uint8 (N, C, H, W) → PIL images (mode L for one channel, RGB for three)."""
    from PIL import Image

    arrays = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    if arrays.shape[-1] == 1:
        return [Image.fromarray(a[:, :, 0]) for a in arrays]  # 2-D uint8: mode L
    return [Image.fromarray(a) for a in arrays]  # (H, W, 3) uint8: mode RGB


def make_grid(images: list[PILImage], pad: int = 1) -> PILImage:
    """The images in a near-square grid with gray gaps, each enlarged (nearest neighbour) by the
    whole factor that brings it closest to ``GRID_CELL_PX`` pixels."""
    from PIL import Image

    if not images:
        raise GenloopError("no images to put in a grid")
    w, h = images[0].size
    scale = max(1, round(GRID_CELL_PX / max(w, h)))
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cw, ch = w * scale, h * scale
    gray = 96 if images[0].mode == "L" else (96, 96, 96)  # gaps that show on black digits
    grid = Image.new(images[0].mode, (cols * (cw + pad) + pad, rows * (ch + pad) + pad), gray)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        cell = image.resize((cw, ch), Image.Resampling.NEAREST)
        grid.paste(cell, (pad + c * (cw + pad), pad + r * (ch + pad)))
    return grid


def save_images(images: list[PILImage], out_dir: str | Path) -> list[Path]:
    """Write ``000.png``, ``001.png`` … and ``grid.png`` into ``out_dir`` (created if
    needed); returns the image paths in order, then the grid's."""
    if not images:
        raise GenloopError("no images to save")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GenloopError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    digits = max(3, len(str(len(images) - 1)))
    paths = []
    for i, image in enumerate(images):
        path = out / f"{i:0{digits}d}.png"
        image.save(path, format="PNG")
        paths.append(path)
    grid = out / "grid.png"
    make_grid(images).save(grid, format="PNG")
    return [*paths, grid]
