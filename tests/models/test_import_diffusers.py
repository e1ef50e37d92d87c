"""``genloop models import`` of a local diffusers Stable Diffusion pipeline folder.

The source is what diffusers writes: a tiny random pipeline built from configs
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel, SD's PNDM scheduler) saved with
``save_pretrained``, its CLIP tokenizer given as the slow files (vocab.json + merges.txt,
written here), and a safety checker and feature extractor named in model_index.json. The
imported version must draw what diffusers' own pipeline draws from the source for the same
seed; broken copies must be refused, naming the file, with the catalog and store untouched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from genloop.errors import GenloopError
from genloop.models.importer import import_checkpoint
from genloop.workspace import Workspace, init_workspace, registry

from ..conftest import run_genloop

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ("a", "red", "green", "blue", "circle", "square", "on", "the", "left", "right", "large")
CONTEXT = 16
CARD = "---\nlicense: mit\n---\n# Tiny SD\n\nA random test pipeline.\n"


def write_clip_tokenizer(out: Path) -> None:
    """A CLIP BPE tokenizer's slow files: characters, each word merged whole, </w> ends."""
    chars = sorted({c for w in WORDS for c in w})
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({f"{c}</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[str] = []
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            merges.append(f"{parts[0]} {parts[1]}")
            vocab.setdefault(merged, len(vocab))
            parts = [merged, *parts[2:]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    merges = list(dict.fromkeys(merges))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT}
    (out / "tokenizer_config.json").write_text(json.dumps(config))


def build_source(root: Path) -> Path:
    """A random StableDiffusionPipeline (16×16 images, 8×8×4 latents) saved by diffusers."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = root / "tokfiles"
    write_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )
    encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CONTEXT,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = PNDMScheduler(  # SD 1.x's
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = root / "Tiny SD"
    unet.save_pretrained(pipe / "unet")
    vae.save_pretrained(pipe / "vae")
    encoder.save_pretrained(pipe / "text_encoder")
    scheduler.save_pretrained(pipe / "scheduler")
    config = json.loads((pipe / "scheduler" / "scheduler_config.json").read_text())
    config["clip_sample"] = False  # as SD 1.x's file has it (PNDM ignores it, DDIM reads it)
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    shutil.copytree(tok_dir, pipe / "tokenizer")
    (pipe / "safety_checker").mkdir()
    (pipe / "safety_checker" / "config.json").write_text("{}")
    (pipe / "feature_extractor").mkdir()
    (pipe / "feature_extractor" / "preprocessor_config.json").write_text("{}")
    (pipe / "README.md").write_text(CARD)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.21.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "requires_safety_checker": True,
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (pipe / "model_index.json").write_text(json.dumps(index, indent=2))
    return pipe


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_source(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def imported(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, Any]:
    ws = init_workspace(tmp_path_factory.mktemp("ws"))
    return ws, import_checkpoint(ws, source)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_pipeline_becomes_a_text_to_image_version_with_its_lineage(
    source: Path, imported: tuple[Workspace, Any]
) -> None:
    ws, info = imported
    assert info.ref == "Tiny-SD@1" and info.family == "text_to_image"
    lineage = info.config["import"]
    assert lineage["source"] == str(source.resolve())
    assert lineage["license"] == "mit" and lineage["model_card"] == CARD
    files = lineage["files"]
    assert files["unet/diffusion_pytorch_model.safetensors"] == _sha(
        source / "unet" / "diffusion_pytorch_model.safetensors"
    )
    assert files["tokenizer/vocab.json"] == _sha(source / "tokenizer" / "vocab.json")
    assert lineage["tokenizer_converted_from"] == ["tokenizer/vocab.json", "tokenizer/merges.txt"]
    assert any(s.startswith("safety_checker/") for s in lineage["skipped"])
    assert any(s.startswith("feature_extractor/") for s in lineage["skipped"])
    assert lineage["sampler"] == "ddim" and "PNDMScheduler" in lineage["notes"][0]
    expected = sum(
        p.numel()
        for part in ("unet", "vae", "text_encoder")
        for p in _load_part(source, part).parameters()
    )
    assert lineage["parameters"] == expected
    out = ws.store.path(info.artifact)
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert not (out / "safety_checker").exists()
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["safety_checker"] == [None, None]


def _load_part(source: Path, part: str) -> Any:
    import diffusers
    from transformers import CLIPTextModel

    if part == "text_encoder":
        return CLIPTextModel.from_pretrained(source / part)
    cls = diffusers.UNet2DConditionModel if part == "unet" else diffusers.AutoencoderKL
    return cls.from_pretrained(source / part)


def _theirs(pipe: Any, prompts: list[str], **kwargs: Any) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompts, output_type="np", **kwargs).images  # (N, H, W, 3) in [0, 1]
    return (np.asarray(out) * 255).round().astype(np.uint8)


def _assert_same(mine: torch.Tensor, theirs: np.ndarray) -> None:
    diff = np.abs(mine.permute(0, 2, 3, 1).numpy().astype(int) - theirs.astype(int))
    assert diff.max() <= 1


def test_it_draws_what_diffusers_draws_from_the_source_for_the_same_seed(
    source: Path, imported: tuple[Workspace, Any]
) -> None:
    """PNDM is not one of our samplers: the import samples with DDIM on its noise schedule,
    which is what diffusers draws with DDIMScheduler.from_config of the source's."""
    import diffusers

    from genloop.models.text_to_image import load_text_to_image

    ws, info = imported
    ours = load_text_to_image(ws.store.path(info.artifact))
    assert ours.image_size == 16 and ours.context == CONTEXT
    prompts = ["a red circle on the left", "a large blue square"]
    mine = ours.generate(prompts, negative_prompts=["green", ""], seed=7, steps=4)
    assert mine.shape == (2, 3, 16, 16) and ours.config["guidance_scale"] == 7.5
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(source, safety_checker=None)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    theirs = _theirs(
        pipe,
        prompts,
        negative_prompt=["green", ""],
        generator=torch.Generator().manual_seed(7),
        num_inference_steps=4,
    )
    _assert_same(mine, theirs)
    assert mine.float().std() > 5
    # diffusers loads the imported folder as it is, with the DDIM scheduler it names
    again = diffusers.StableDiffusionPipeline.from_pretrained(ws.store.path(info.artifact))
    assert isinstance(again.scheduler, diffusers.DDIMScheduler)
    dpm = ours.generate(prompts[:1], seed=2, steps=3, sampler="dpm", guidance_scale=3.0)
    again.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(again.scheduler.config)
    _assert_same(
        dpm,
        _theirs(
            again,
            prompts[:1],
            generator=torch.Generator().manual_seed(2),
            num_inference_steps=3,
            guidance_scale=3.0,
        ),
    )


def test_the_cli_says_what_it_imported_left_out_and_mapped(source: Path, tmp_path: Path) -> None:
    result = run_genloop(
        init_workspace(tmp_path / "ws"), "models", "import", source, "--name", "sd"
    )
    assert result.returncode == 0, result.output
    out = result.stdout
    assert "imported sd@1: StableDiffusionPipeline (text_to_image)" in out
    assert "license mit" in out and "made tokenizer.json from" in out
    assert "left out: safety_checker/" in out and "left out: feature_extractor/" in out
    assert "note: the pipeline's PNDMScheduler" in out


def _state(ws: Workspace) -> tuple[list[str], list[str]]:
    refs = [v.ref for v in registry.list_models(ws)]
    files = sorted(str(p.relative_to(ws.root)) for p in ws.store.root.rglob("*"))
    return refs, files


def _break(pipe: Path, how: str) -> str:
    """Break a copy of the source; the text the refusal must contain."""
    if how == "missing part":
        shutil.rmtree(pipe / "vae")
        return "vae"
    if how == "corrupt safetensors":
        weights = pipe / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        return "truncated"
    if how == "pickle":
        state = _load_part(pipe, "text_encoder").state_dict()
        (pipe / "text_encoder" / "model.safetensors").unlink()
        torch.save(state, pipe / "text_encoder" / "pytorch_model.bin")
        return "--trust-pickle"
    if how == "custom class":
        index = json.loads((pipe / "model_index.json").read_text())
        index["unet"] = ["my_pipeline", "MyUNet"]
        (pipe / "model_index.json").write_text(json.dumps(index))
        return "custom component"
    if how == "custom pipeline":
        index = json.loads((pipe / "model_index.json").read_text())
        index["_class_name"] = "MyPipeline"
        (pipe / "model_index.json").write_text(json.dumps(index))
        (pipe / "pipeline.py").write_text("import os\n")
        return "Python code"
    if how == "wrong weights":
        other = json.loads((pipe / "vae" / "config.json").read_text())
        other["latent_channels"] = 8
        (pipe / "vae" / "config.json").write_text(json.dumps(other))
        return "do not fit"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "missing part",
        "corrupt safetensors",
        "pickle",
        "custom class",
        "custom pipeline",
        "wrong weights",
    ],
)
def test_a_broken_pipeline_is_refused_and_nothing_is_written(
    source: Path, imported: tuple[Workspace, Any], tmp_path: Path, how: str
) -> None:
    ws, _ = imported
    pipe = tmp_path / "broken"
    shutil.copytree(source, pipe)
    expected = _break(pipe, how)
    before = _state(ws)
    result = run_genloop(ws, "models", "import", pipe)
    assert result.returncode != 0
    assert expected in result.output and "Traceback" not in result.output
    assert _state(ws) == before


def test_trusted_pickle_weights_are_converted_and_draw_the_same(
    source: Path, imported: tuple[Workspace, Any], tmp_path: Path
) -> None:
    from genloop.models.text_to_image import load_text_to_image

    ws, first = imported
    pipe = tmp_path / "pickled"
    shutil.copytree(source, pipe)
    _break(pipe, "pickle")
    state = _load_part(pipe, "unet").state_dict()
    (pipe / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, pipe / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(GenloopError, match="pickle"):
        import_checkpoint(ws, pipe, name="pickled")
    info = import_checkpoint(ws, pipe, name="pickled", trust_pickle=True)
    lineage = info.config["import"]
    assert sorted(lineage["converted_from_pickle"]) == [
        "text_encoder/pytorch_model.bin",
        "unet/diffusion_pytorch_model.bin",
    ]
    assert lineage["parameters"] == first.config["import"]["parameters"]
    out = ws.store.path(info.artifact)
    assert not list(out.rglob("*.bin"))
    a = load_text_to_image(out).generate(["a red square"], seed=3, steps=2)
    b = load_text_to_image(ws.store.path(first.artifact)).generate(
        ["a red square"], seed=3, steps=2
    )
    assert torch.equal(a, b)


def test_sharded_text_encoder_weights_are_checked_and_joined(
    source: Path, imported: tuple[Workspace, Any], tmp_path: Path
) -> None:
    ws, _ = imported
    pipe = tmp_path / "sharded"
    shutil.copytree(source, pipe)
    shutil.rmtree(pipe / "text_encoder")
    _load_part(source, "text_encoder").save_pretrained(pipe / "text_encoder", max_shard_size="20KB")
    shards = sorted((pipe / "text_encoder").glob("model-*.safetensors"))
    assert len(shards) > 1
    info = import_checkpoint(ws, pipe, name="sharded")
    out = ws.store.path(info.artifact)
    assert (out / "text_encoder" / "model.safetensors").is_file()
    assert not list((out / "text_encoder").glob("model-*"))
    # a shard that does not hold what the index says is refused
    index = json.loads((pipe / "text_encoder" / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = (
        shards[-1].name if index["weight_map"][name] != shards[-1].name else shards[0].name
    )
    (pipe / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(index))
    before = _state(ws)
    with pytest.raises(GenloopError, match="does not hold it"):
        import_checkpoint(ws, pipe, name="sharded")
    assert _state(ws) == before
