"""Typed configuration for every stage, YAML loading and ``--set`` overrides.

A pipeline file is one YAML mapping whose top-level keys are the sections below
(``data``, ``tokenizer``, ``model``, ``train``, ``eval``, ``gate``, ``tune``, ``optimize``,
``serve``, ``monitor``, ``feedback``, ``security``). Every section is optional; ``data``,
``tune`` and ``optimize`` are ``None`` unless given (their presence asks for that stage),
the others are filled with their defaults.

Modules take plain arguments, not these objects: a command loads the config once with
:func:`load_config` and passes the fields it needs along.

Every model forbids unknown keys, and every mistake becomes one :class:`ConfigError` line
that names the key (``unknown key 'train.lerning_rate' in run.yaml (did you mean
'train.lr'? ...)``), so a typo never falls back silently to a default.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import (
    Annotated,
    Any,
    Literal,
    TypeGuard,
    TypeVar,
    Union,
    get_args,
    get_origin,
    overload,
)
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from genloop.errors import ConfigError

__all__ = [
    "BuiltinSource",
    "CategoricalParam",
    "CleanConfig",
    "CodePrepConfig",
    "CodeSource",
    "DataConfig",
    "DedupConfig",
    "DiffusionConfig",
    "EvalConfig",
    "FeedbackConfig",
    "FilesSource",
    "FloatParam",
    "GanConfig",
    "GateConfig",
    "GateRule",
    "GenloopConfig",
    "GuardrailsConfig",
    "HfDiskSource",
    "ImagePrepConfig",
    "ImagesSource",
    "IntParam",
    "LoraConfig",
    "ModelConfig",
    "MonitorConfig",
    "OptimizeConfig",
    "ParamSpec",
    "PiiConfig",
    "RateLimitConfig",
    "RetrainConfig",
    "SecurityConfig",
    "ServeConfig",
    "Source",
    "SplitConfig",
    "TokenizerConfig",
    "TrainAugmentConfig",
    "TrainConfig",
    "TuneConfig",
    "UrlSource",
    "VaeConfig",
    "WorkspaceConfig",
    "apply_overrides",
    "config_schema",
    "load_config",
    "parse_config",
]

# Unknown keys are errors everywhere (the loader turns them into "did you mean" lines).
_STRICT = ConfigDict(extra="forbid")

# The names datasets, pipelines and models may take (the same rule as model refs).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MiB = 1024 * 1024
GiB = 1024 * MiB

TEXT_FAMILIES = ("causal_lm", "seq2seq")
Preset = Literal["tiny", "small", "base"]


def _check_http_urls(urls: Sequence[str]) -> None:
    for url in urls:
        if not re.match(r"^https?://[^\s/]+", url):
            raise ValueError(f"{url!r} is not an http:// or https:// URL")


# ---------------------------------------------------------------------------------------
# workspace
# ---------------------------------------------------------------------------------------


class WorkspaceConfig(BaseModel):
    """Where the catalog and the artifact store live."""

    model_config = _STRICT

    path: Path | None = Field(
        None,
        description="Workspace folder; --workspace overrides it. Unset: $GENLOOP_HOME or "
        "./genloop-workspace.",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the catalog (PostgreSQL to share it between machines). "
        "Unset: $GENLOOP_DATABASE_URL, else SQLite inside the workspace.",
    )


# ---------------------------------------------------------------------------------------
# data: sources (a list discriminated on `type`) and preparation steps
# ---------------------------------------------------------------------------------------


class FilesSource(BaseModel):
    """Local files: .txt, .md, .json/.jsonl, .csv, .parquet."""

    model_config = _STRICT

    type: Literal["files"] = Field(description="Source kind.")
    paths: list[str] = Field(
        min_length=1,
        description="Files, folders or glob patterns (** allowed); relative ones are taken from "
        "the config file's folder.",
    )
    field: str | None = Field(
        None, description="For .json/.jsonl: the field holding the text (default: 'text')."
    )
    columns: list[str] | None = Field(
        None,
        min_length=1,
        description="For .csv/.parquet: columns joined into the text (default: 'text').",
    )
    encoding: str = Field("utf-8", description="Text encoding of the files.")


class CodeSource(BaseModel):
    """A source-code directory; the language comes from each file's extension."""

    model_config = _STRICT

    type: Literal["code"] = Field(description="Source kind.")
    path: Path = Field(
        description="Root directory to walk; a relative path is taken from the config file's "
        "folder."
    )
    extensions: list[str] | None = Field(
        None, description="Only files with these extensions, e.g. ['.py']. Unset: all known."
    )
    languages: list[str] | None = Field(
        None, description="Only these languages, e.g. ['python']. Unset: all known."
    )
    exclude: list[str] = Field(
        default_factory=lambda: ["**/.git/**", "**/__pycache__/**", "**/node_modules/**"],
        description="Glob patterns of paths to skip.",
    )
    max_bytes: int = Field(1_000_000, gt=0, description="Skip files larger than this.")


class BuiltinSource(BaseModel):
    """A corpus present on every machine; nothing is downloaded."""

    model_config = _STRICT

    type: Literal["builtin"] = Field(description="Source kind.")
    name: Literal["python-stdlib", "python-docs", "digits", "shapes"] = Field(
        description="python-stdlib: this interpreter's standard library sources; python-docs: "
        "its docstrings and pydoc topics; digits: scikit-learn's 8×8 digits with labels; "
        "shapes: drawn coloured shapes with compositional captions (RGB: set images.channels "
        "to 3 and images.size to the source's size)."
    )
    max_files: int | None = Field(
        None,
        ge=1,
        description="python-stdlib/python-docs: keep only the first N files (in path order), "
        "for quick runs; unset: all.",
    )
    count: int | None = Field(
        None, ge=1, description="shapes: number of images drawn (unset: 20000)."
    )
    size: int | None = Field(
        None, ge=12, le=1024, description="shapes: image side in pixels (unset: 32)."
    )
    seed: int | None = Field(None, description="shapes: seed of the drawing (unset: 0).")


class UrlSource(BaseModel):
    """HTTP(S) pages or files; HTML is reduced to its main text."""

    model_config = _STRICT

    type: Literal["url"] = Field(description="Source kind.")
    urls: list[str] = Field(min_length=1, description="http:// or https:// URLs to fetch.")
    allow_private: bool = Field(
        False, description="Allow loopback, private and link-local addresses (off: refused)."
    )
    max_bytes: int = Field(10 * MiB, gt=0, description="Largest response body accepted.")
    timeout_s: float = Field(10.0, gt=0, description="Timeout of each request, in seconds.")
    respect_robots: bool = Field(True, description="Obey the site's robots.txt.")
    user_agent: str = Field("genloop", min_length=1, description="User-Agent header sent.")

    @field_validator("urls")
    @classmethod
    def _http_only(cls, urls: list[str]) -> list[str]:
        _check_http_urls(urls)
        return urls


class HfDiskSource(BaseModel):
    """A Hugging Face dataset saved with ``save_to_disk``."""

    model_config = _STRICT

    type: Literal["hf_disk"] = Field(description="Source kind.")
    path: Path = Field(
        description="Directory written by Dataset.save_to_disk; a relative path is taken from "
        "the config file's folder."
    )
    split: str | None = Field(
        None, description="Split to read from a DatasetDict. Unset: 'train', or the only one."
    )
    field: str = Field(
        "text", description="Column holding the text (the caption, with image_field)."
    )
    image_field: str | None = Field(
        None,
        description="Column holding images (a datasets Image feature): each row becomes a "
        "captioned image record, 'field' naming its caption column. Unset: text records.",
    )


class ImagesSource(BaseModel):
    """An image folder; a sub-folder's name is the label of the images in it. A
    metadata.jsonl (Hugging Face imagefolder: file_name + a caption column) adds captions."""

    model_config = _STRICT

    type: Literal["images"] = Field(description="Source kind.")
    path: Path = Field(
        description="Root folder (class sub-folders optional); a relative path is taken from "
        "the config file's folder."
    )
    extensions: list[str] = Field(
        default_factory=lambda: [".png", ".jpg", ".jpeg"], description="Image file extensions."
    )
    text_column: str = Field(
        "text", description="The metadata.jsonl field holding each image's caption."
    )


Source = Annotated[
    FilesSource | CodeSource | BuiltinSource | UrlSource | HfDiskSource | ImagesSource,
    Field(discriminator="type"),
]


class CleanConfig(BaseModel):
    """Text cleanup and quality filters."""

    model_config = _STRICT

    normalize: Literal["NFC", "NFKC", "none"] = Field("NFC", description="Unicode normalization.")
    strip_whitespace: bool = Field(True, description="Trim lines and collapse runs of blank lines.")
    lowercase: bool = Field(False, description="Lowercase the text (off for generative models).")
    remove_stopwords: bool = Field(
        False, description="Drop stop words (off for generative models)."
    )
    min_chars: int = Field(16, ge=0, description="Drop records shorter than this (characters).")
    max_chars: int | None = Field(
        1_000_000, gt=0, description="Drop records longer than this (characters); unset: no limit."
    )
    max_repetition_ratio: float = Field(
        0.5, gt=0, le=1, description="Drop records whose share of repeated lines exceeds this."
    )
    max_symbol_ratio: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Drop records whose share of non-alphanumeric, non-space characters "
        "exceeds this.",
    )

    @model_validator(mode="after")
    def _lengths(self) -> CleanConfig:
        if self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is above max_chars ({self.max_chars})")
        return self


class DedupConfig(BaseModel):
    """Exact and near-duplicate removal (MinHash LSH)."""

    model_config = _STRICT

    exact: bool = Field(True, description="Drop exact duplicates (after cleaning).")
    near: bool = Field(True, description="Drop near duplicates with MinHash LSH.")
    threshold: float = Field(
        0.85, gt=0, le=1, description="Jaccard similarity at which two records are near duplicates."
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    shingle_size: int = Field(5, ge=1, description="Length of the shingles hashed (in words).")


PiiKind = Literal["email", "phone", "ip", "card", "secret"]
ALL_PII_KINDS: tuple[PiiKind, ...] = get_args(PiiKind)


class PiiConfig(BaseModel):
    """Redaction of personal data and secrets."""

    model_config = _STRICT

    enabled: bool = Field(True, description="Redact PII before anything is stored.")
    kinds: list[PiiKind] = Field(
        default_factory=lambda: list(ALL_PII_KINDS),
        description="What to redact: email, phone, ip, card (payment cards), secret (API keys "
        "and tokens).",
    )


class CodePrepConfig(BaseModel):
    """Steps for source-code records."""

    model_config = _STRICT

    require_parse: bool = Field(True, description="Drop files that do not parse (Python).")
    strip_license_header: bool = Field(False, description="Remove leading license comments.")
    format: bool = Field(
        False,
        description="Format Python with ruff's formatter, keeping only files whose syntax "
        "tree it leaves unchanged (others dropped: unformattable, format_changed_ast); other "
        "languages: trailing whitespace stripped.",
    )


class ImagePrepConfig(BaseModel):
    """Steps for image records."""

    model_config = _STRICT

    size: int = Field(8, ge=4, le=4096, description="Images are resized to size × size pixels.")
    channels: Literal[1, 3] = Field(1, description="1 (grayscale) or 3 (RGB).")
    normalize: Literal["minus_one_one", "zero_one"] = Field(
        "minus_one_one", description="Pixel range after normalization: [-1, 1] or [0, 1]."
    )


class SplitConfig(BaseModel):
    """Train / validation / test split, by document."""

    model_config = _STRICT

    val: float = Field(0.05, ge=0, lt=1, description="Share of documents for validation.")
    test: float = Field(0.05, ge=0, lt=1, description="Share of documents for test.")
    seed: int = Field(0, description="Seed of the split.")

    @model_validator(mode="after")
    def _room_for_train(self) -> SplitConfig:
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must be below 1 (got {self.val} + {self.test})")
        return self


class DataConfig(BaseModel):
    """A dataset: where its records come from and how they are prepared."""

    model_config = _STRICT

    name: str = Field(pattern=NAME_PATTERN, description="Dataset name in the catalog.")
    kind: Literal["text", "code", "images"] = Field("text", description="What the records are.")
    sources: list[Source] = Field(
        min_length=1, description="Where records come from; each item has a 'type'."
    )
    clean: CleanConfig = Field(default_factory=CleanConfig, description="Text cleanup.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Duplicate removal.")
    pii: PiiConfig = Field(default_factory=PiiConfig, description="PII redaction.")
    code: CodePrepConfig = Field(default_factory=CodePrepConfig, description="Code steps.")
    images: ImagePrepConfig = Field(default_factory=ImagePrepConfig, description="Image steps.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Splits by document.")
    workers: int | None = Field(
        None, ge=1, description="Worker processes. Unset: the number of CPUs."
    )
    sample_records: int = Field(
        20, ge=0, description="Records kept as samples in the dataset card."
    )


# ---------------------------------------------------------------------------------------
# tokenizer and model
# ---------------------------------------------------------------------------------------

DEFAULT_SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
# special tokens a genloop BPE makes its mask token (genloop.data.tokenizer.MASK_TOKENS)
MASK_TOKENS = ("<|mask|>", "[MASK]", "<mask>")


class TokenizerConfig(BaseModel):
    """A byte-level BPE tokenizer trained on the dataset, or an existing one."""

    model_config = _STRICT

    kind: Literal["bpe", "pretrained"] = Field(
        "bpe", description="bpe: train one on the dataset; pretrained: load from 'path'."
    )
    path: Path | None = Field(
        None,
        description="Tokenizer directory (Hugging Face layout) when kind is pretrained; a "
        "relative path is taken from the config file's folder.",
    )
    vocab_size: int = Field(8192, ge=300, le=1_000_000, description="Vocabulary size for bpe.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a bpe merge.")
    special_tokens: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS),
        description="Special tokens added to the vocabulary; the first ends a document.",
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template (Hugging Face convention); by default genloop's "
        "template, which marks assistant turns for SFT loss masking.",
    )
    seq_len: int = Field(256, ge=8, description="Tokens per packed training sequence.")
    sentinel_tokens: int = Field(
        0,
        ge=0,
        le=1000,
        description="Add this many sentinel tokens <extra_id_0>, <extra_id_1>, … (T5's names) "
        "to a bpe tokenizer's special tokens: the span_corruption objective needs them (T5 "
        "has 100).",
    )

    @model_validator(mode="after")
    def _path_for_pretrained(self) -> TokenizerConfig:
        if self.kind == "pretrained" and self.path is None:
            raise ValueError("kind 'pretrained' needs a 'path' to the tokenizer directory")
        if self.kind == "bpe" and self.path is not None:
            raise ValueError("'path' is only used with kind 'pretrained'")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError("special_tokens has duplicates")
        if self.kind == "pretrained" and self.sentinel_tokens:
            raise ValueError(
                "sentinel_tokens is only used with kind 'bpe' (a pretrained tokenizer brings "
                "its own, like T5's <extra_id_N>)"
            )
        return self


class LoraConfig(BaseModel):
    """LoRA adapters (peft) for fine-tuning; merged into the weights on export."""

    model_config = _STRICT

    r: int = Field(8, ge=1, le=1024, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt, e.g. ['q_proj', 'v_proj']. Unset: the family's "
        "attention projections.",
    )
    load_in_4bit: bool = Field(
        False,
        description="QLoRA: load the base in 4-bit NF4 (bitsandbytes, on a CUDA GPU or the "
        "CPU) and train the adapters on top; the export merges them into the dequantized base.",
    )


class VaeConfig(BaseModel):
    """VAE-only settings."""

    model_config = _STRICT

    beta: float = Field(1.0, ge=0, description="Weight β of the KL term.")


class AutoencoderKlConfig(BaseModel):
    """autoencoder_kl settings (Stable Diffusion's first stage, diffusers AutoencoderKL)."""

    model_config = _STRICT

    latent_channels: int = Field(4, ge=1, description="Channels of the latent image.")
    downsample: int = Field(4, ge=1, description="Image side / latent side (a power of two).")
    kl_weight: float = Field(1e-6, ge=0, description="Weight of the KL term (SD: 1e-6).")
    recon_loss: Literal["l1", "mse"] = Field("l1", description="Pixel reconstruction loss.")


class GanConfig(BaseModel):
    """GAN-only settings (DCGAN-style)."""

    model_config = _STRICT

    loss: Literal["hinge", "non_saturating"] = Field("hinge", description="Adversarial loss.")
    spectral_norm: bool = Field(True, description="Spectral norm in the discriminator.")
    ema_decay: float | None = Field(
        0.999, gt=0, lt=1, description="Decay of the generator's EMA copy; unset: no EMA."
    )


class DiffusionConfig(BaseModel):
    """Diffusion-only settings (diffusers UNet2DModel)."""

    model_config = _STRICT

    timesteps: int = Field(1000, ge=1, description="Training noise steps T (DDPM).")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field(
        "squaredcos_cap_v2", description="Noise schedule β_t."
    )
    sampler: Literal["ddpm", "ddim", "dpm"] = Field(
        "ddim", description="Sampler used to generate (dpm: DPM-Solver++, text_to_image only)."
    )
    sample_steps: int = Field(50, ge=1, description="Denoising steps when sampling with DDIM.")
    guidance_scale: float = Field(
        2.0, ge=0, description="Classifier-free guidance scale w (conditional models)."
    )
    cond_drop_prob: float = Field(
        0.1, ge=0, lt=1, description="Share of training labels dropped, for guidance."
    )
    latent_vae: str | None = Field(
        None,
        description="Model ref of a VAE: diffuse in its latent space (latent diffusion); for "
        "text_to_image, of its autoencoder_kl.",
    )
    text_encoder: str | None = Field(
        None,
        description="text_to_image: the CLIP model (ref or local folder) whose frozen text "
        "encoder conditions the UNet.",
    )

    @model_validator(mode="after")
    def _steps(self) -> DiffusionConfig:
        if self.sample_steps > self.timesteps:
            raise ValueError(
                f"sample_steps ({self.sample_steps}) exceeds timesteps ({self.timesteps})"
            )
        return self


class ClipModelConfig(BaseModel):
    """CLIP-only sizes (transformers CLIPModel): a ViT image tower and a causal text tower."""

    model_config = _STRICT

    patch_size: int = Field(4, ge=1, description="ViT patch side in pixels.")
    vision_hidden: int = Field(128, ge=8, description="Image tower width.")
    vision_layers: int = Field(3, ge=1, description="Image tower layers.")
    text_hidden: int = Field(128, ge=8, description="Text tower width.")
    text_layers: int = Field(3, ge=1, description="Text tower layers.")
    heads: int = Field(4, ge=1, description="Attention heads in both towers.")
    projection_dim: int = Field(128, ge=8, description="Joint embedding size.")
    max_text_length: int = Field(32, ge=4, description="Text context in tokens (eos included).")


class MaskedLmConfig(BaseModel):
    """masked_lm only: which BERT-class encoder (transformers BertConfig or ModernBertConfig)."""

    model_config = _STRICT

    architecture: Literal["bert", "modernbert"] = Field(
        "bert",
        description="bert (absolute positions, post-norm) or modernbert (rotary positions, "
        "pre-norm, gated MLP, alternating local/global attention).",
    )


class ModelConfig(BaseModel):
    """The model family and its size; text overrides apply on top of the preset."""

    model_config = _STRICT

    family: Literal[
        "causal_lm",
        "seq2seq",
        "vae",
        "gan",
        "diffusion",
        "clip",
        "captioning",
        "autoencoder_kl",
        "text_to_image",
        "masked_lm",
    ] = Field("causal_lm", description="Model family.")
    preset: Preset | None = Field(
        None,
        description="Text size: tiny (~5M), small (~30M), base (~125M parameters). "
        "Unset: tiny, unless base_model is given.",
    )
    base_model: str | None = Field(
        None,
        description="Fine-tune from this model ref (NAME, NAME@3, NAME@production) or local "
        "Hugging Face checkpoint directory.",
    )
    # text architecture overrides
    n_layer: int | None = Field(None, ge=1, description="Transformer layers.")
    n_embd: int | None = Field(None, ge=8, description="Hidden size.")
    n_head: int | None = Field(None, ge=1, description="Attention heads.")
    n_kv_head: int | None = Field(
        None, ge=1, description="Key/value heads (grouped-query attention); unset: n_head."
    )
    intermediate_size: int | None = Field(None, ge=1, description="MLP hidden size.")
    activation: Literal["silu", "gelu", "gelu_new", "relu"] | None = Field(
        None, description="MLP activation."
    )
    context_length: int | None = Field(None, ge=8, description="Maximum sequence length.")
    dropout: float | None = Field(None, ge=0, lt=1, description="Dropout probability.")
    tie_embeddings: bool | None = Field(None, description="Share input and output embeddings.")
    lora: LoraConfig | None = Field(
        None, description="Fine-tune with LoRA adapters instead of all weights."
    )
    # image families
    image_size: int | None = Field(
        None, ge=4, description="Image side in pixels. Unset: data.images.size."
    )
    channels: Literal[1, 3] | None = Field(
        None, description="Image channels. Unset: data.images.channels."
    )
    num_classes: int | None = Field(
        None, ge=1, description="Class-conditional with this many labels; unset: unconditional."
    )
    base_channels: int = Field(32, ge=4, description="Width of the first conv/UNet block.")
    latent_dim: int = Field(16, ge=1, description="VAE latent size / GAN noise size.")
    vae: VaeConfig = Field(default_factory=VaeConfig, description="VAE settings.")
    gan: GanConfig = Field(default_factory=GanConfig, description="GAN settings.")
    diffusion: DiffusionConfig = Field(
        default_factory=DiffusionConfig, description="Diffusion settings."
    )
    clip: ClipModelConfig = Field(default_factory=ClipModelConfig, description="CLIP sizes.")
    autoencoder_kl: AutoencoderKlConfig = Field(
        default_factory=AutoencoderKlConfig, description="autoencoder_kl settings."
    )
    masked_lm: MaskedLmConfig = Field(
        default_factory=MaskedLmConfig, description="masked_lm settings."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.preset is not None and self.base_model is not None:
            raise ValueError(
                "give either preset (from scratch) or base_model (fine-tune), not both"
            )
        if self.lora is not None and self.base_model is None:
            raise ValueError("lora needs a base_model to adapt")
        if self.n_embd is not None and self.n_head is not None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head is not None and self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})"
            )
        return self


# ---------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------

Objective = Literal[
    "lm",
    "sft",
    "dpo",
    "vae",
    "gan",
    "diffusion",
    "contrastive",
    "captioning",
    "autoencoder_kl",
    "text_to_image",
    "span_corruption",
    "mlm",
    "classification",
    "token_classification",
    "embedding",
]
OBJECTIVE_FAMILIES: dict[str, tuple[str, ...]] = {
    "lm": ("causal_lm",),  # seq2seq pretrains with span_corruption
    "sft": TEXT_FAMILIES,
    "dpo": ("causal_lm",),
    "vae": ("vae",),
    "gan": ("gan",),
    "diffusion": ("diffusion",),
    "contrastive": ("clip",),
    "captioning": ("captioning",),
    "autoencoder_kl": ("autoencoder_kl",),
    "text_to_image": ("text_to_image",),
    "span_corruption": ("seq2seq",),
    "mlm": ("masked_lm",),
    "classification": ("masked_lm",),
    "token_classification": ("masked_lm",),
    "embedding": ("masked_lm",),
}


class TrainAugmentConfig(BaseModel):
    """Image augmentation applied at training time."""

    model_config = _STRICT

    flip: bool = Field(
        False, description="Random horizontal flips (off: digits are not symmetric)."
    )
    crop_padding: int = Field(
        0, ge=0, description="Pad by this many pixels, then random-crop back."
    )
    jitter: float = Field(0.0, ge=0, le=1, description="Brightness/contrast jitter strength.")


Beta = Annotated[float, Field(ge=0, lt=1)]


class TrainConfig(BaseModel):
    """The training loop: objective, optimizer, schedule, evaluation and checkpoints."""

    model_config = _STRICT

    objective: Objective = Field(
        "lm",
        description="lm (pretraining), sft, dpo, an image family's loss (vae, gan, diffusion), "
        "contrastive (clip), captioning, autoencoder_kl, text_to_image, span_corruption "
        "(T5 pretraining for seq2seq), or for masked_lm: mlm (pretraining), classification, "
        "token_classification, embedding.",
    )
    dataset: str | None = Field(
        None, description="Dataset NAME or NAME@VERSION. Unset: the one the data section makes."
    )
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW).")
    min_lr: float = Field(3e-5, ge=0, description="Learning rate at the end of the schedule.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup."
    )
    weight_decay: float = Field(
        0.1, ge=0, description="AdamW weight decay (not applied to norms and biases)."
    )
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW (β1, β2), each in [0, 1).")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    max_steps: int = Field(2000, ge=1, description="Optimizer steps in total.")
    batch_size: int = Field(16, ge=1, description="Sequences (or images) per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    grad_clip: float | None = Field(
        1.0, gt=0, description="Clip the gradient norm to this; unset: no clipping."
    )
    eval_every: int = Field(200, ge=1, description="Validate every this many steps.")
    eval_batches: int = Field(20, ge=1, description="Validation batches per evaluation.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without improvement."
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the CE loss.")
    z_loss: float = Field(0.0, ge=0, description="Weight of the z-loss (log² of the softmax sum).")
    dpo_beta: float = Field(0.1, gt=0, description="DPO β (strength of the KL anchor).")
    noise_density: float = Field(
        0.15, gt=0, lt=1, description="span_corruption: share of tokens masked (T5: 0.15)."
    )
    mean_noise_span_length: float = Field(
        3.0, ge=1, description="span_corruption: mean length of a masked span (T5: 3)."
    )
    mlm_probability: float = Field(
        0.15, gt=0, lt=1, description="mlm: share of tokens (or words) masked per sequence."
    )
    whole_word_mask: bool = Field(
        False, description="mlm: mask whole words (every sub-token of a chosen word)."
    )
    hard_negatives: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="contrastive: share of each batch given to pairs whose caption is one "
        "token away from another's in the batch (hard negatives).",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto: bf16 autocast on a GPU that supports it or a CPU with "
        "AVX512-BF16/AMX, else fp32.",
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile the model (falls back to eager if compiling fails). "
        "auto: for a single-process causal_lm lm run of at least 1000 steps on a GPU, where "
        "the warm-up pays for itself; on a CPU it does not (see docs/training.md).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="How to shard under torchrun: DDP, or FSDP2 for large models."
    )
    seed: int = Field(0, description="Seed for initialization, data order and dropout.")
    checkpoint_every: int = Field(500, ge=1, description="Save a checkpoint every this many steps.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept (plus the best).")
    resume: bool = Field(False, description="Continue from the latest checkpoint of the run.")
    log_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="Extra metric sinks (the catalog always gets them)."
    )
    augment: TrainAugmentConfig = Field(
        default_factory=TrainAugmentConfig, description="Image augmentation."
    )

    @model_validator(mode="after")
    def _schedule(self) -> TrainConfig:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be less than max_steps ({self.max_steps})"
            )
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) is above lr ({self.lr})")
        return self


# ---------------------------------------------------------------------------------------
# evaluation and the release gate
# ---------------------------------------------------------------------------------------


EvalSuite = Literal[
    "perplexity",
    "generation",
    "code",
    "bias",
    "lm_eval",
    "image",
    "augment",
    "clip",
    "captioning",
    "t2i",
    "mlm",
    "classification",
    "token_classification",
    "retrieval",
]
_DEFAULT_SUITES: tuple[EvalSuite, ...] = ("perplexity", "generation")


class EvalConfig(BaseModel):
    """Which suites run and how generations are made."""

    model_config = _STRICT

    suites: list[EvalSuite] = Field(
        default_factory=lambda: list(_DEFAULT_SUITES), description="Suites to run."
    )
    split: Literal["val", "test"] = Field("test", description="Dataset split evaluated.")
    max_samples: int | None = Field(
        200, ge=1, description="Documents or pairs per suite; unset: all."
    )
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per sample.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    seed: int = Field(0, description="Seed for sampling.")
    num_samples: int = Field(10, ge=1, description="Completions per code task (n of pass@k).")
    k: list[int] = Field(
        default_factory=lambda: [1, 5], min_length=1, description="k values of pass@k."
    )
    tasks_path: Path | None = Field(
        None, description="Code tasks JSONL (prompt, tests). Unset: the bundled demo tasks."
    )
    bias_suite_path: Path | None = Field(
        None, description="Bias probe suite file. Unset: the bundled suite."
    )
    lm_eval_tasks: list[Path] = Field(
        default_factory=list,
        description="lm-evaluation-harness task YAML files the lm_eval suite runs (local "
        "data only).",
    )
    timeout_s: float = Field(10.0, gt=0, description="Wall-clock limit per sandboxed test run.")
    sandbox_memory_mb: int = Field(512, ge=16, description="Memory limit of the code sandbox.")
    image_samples: int = Field(1000, ge=10, description="Images generated for FID/KID/IS.")
    inception_weights: Path | None = Field(
        None,
        description="Local InceptionV3 weights for FID. Unset: a classifier trained on the "
        "dataset.",
    )
    t2i_prompts: int = Field(
        16, ge=1, le=1024, description="Text-to-image: distinct prompts per group (seen, held-out)."
    )
    t2i_images_per_prompt: int = Field(
        4, ge=1, le=64, description="Text-to-image: images drawn per prompt."
    )
    t2i_steps: int | None = Field(
        None, ge=1, description="Text-to-image: denoising steps. Unset: the model's own."
    )
    clip_model: str | None = Field(
        None,
        description="Text-to-image: the clip model ref that scores images (CLIP score, FID on "
        "CLIP features). Unset: the one the model's text encoder came from.",
    )

    @model_validator(mode="after")
    def _k_within_n(self) -> EvalConfig:
        bad = [k for k in self.k if not 1 <= k <= self.num_samples]
        if bad:
            raise ValueError(f"every k must be between 1 and num_samples ({self.num_samples})")
        return self


GateOp = Literal["max_increase_pct", "max_decrease_pct", "min", "max", "no_decrease", "no_increase"]


class GateRule(BaseModel):
    """One release condition: the candidate's metric against production (or an absolute)."""

    model_config = _STRICT

    metric: str = Field(min_length=1, description="Metric name, e.g. perplexity or pass@1.")
    op: GateOp = Field(
        description="max_increase_pct / max_decrease_pct: relative change vs production at "
        "most 'value' %; min / max: absolute bound; no_decrease / no_increase: vs production."
    )
    value: float | None = Field(
        None, description="Bound for the op (a percentage for *_pct); unused by no_* ops."
    )

    @model_validator(mode="after")
    def _value_fits_op(self) -> GateRule:
        if self.op in ("no_decrease", "no_increase"):
            if self.value is not None:
                raise ValueError(f"op {self.op!r} takes no value")
        elif self.value is None:
            raise ValueError(f"op {self.op!r} needs a value")
        elif self.op.endswith("_pct") and self.value < 0:
            raise ValueError(f"op {self.op!r} needs a value ≥ 0 (a percentage)")
        return self


class GateConfig(BaseModel):
    """Rules a candidate must pass before it is promoted."""

    model_config = _STRICT

    rules: list[GateRule] = Field(default_factory=list, description="All must pass.")


# ---------------------------------------------------------------------------------------
# tuning
# ---------------------------------------------------------------------------------------


class FloatParam(BaseModel):
    """A float sampled from [low, high]."""

    model_config = _STRICT

    type: Literal["float"] = Field(description="Parameter kind.")
    low: float = Field(description="Lower bound.")
    high: float = Field(description="Upper bound.")
    log: bool = Field(False, description="Sample on a log scale (low must be > 0).")
    step: float | None = Field(None, gt=0, description="Discretization step; unset: continuous.")

    @model_validator(mode="after")
    def _bounds(self) -> FloatParam:
        _check_bounds(self.low, self.high, self.log)
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self


class IntParam(BaseModel):
    """An integer sampled from [low, high]."""

    model_config = _STRICT

    type: Literal["int"] = Field(description="Parameter kind.")
    low: int = Field(description="Lower bound (inclusive).")
    high: int = Field(description="Upper bound (inclusive).")
    log: bool = Field(False, description="Sample on a log scale (low must be > 0).")
    step: int = Field(1, ge=1, description="Step between values.")

    @model_validator(mode="after")
    def _bounds(self) -> IntParam:
        _check_bounds(self.low, self.high, self.log)
        if self.log and self.step != 1:
            raise ValueError("log needs step 1")
        return self


class CategoricalParam(BaseModel):
    """One of a list of values."""

    model_config = _STRICT

    type: Literal["categorical"] = Field(description="Parameter kind.")
    choices: list[str | int | float | bool | None] = Field(
        min_length=1, description="The values to choose from."
    )


def _check_bounds(low: float, high: float, log: bool) -> None:
    if low >= high:
        raise ValueError(f"low ({low}) must be less than high ({high})")
    if log and low <= 0:
        raise ValueError(f"log scale needs low > 0 (got {low})")


ParamSpec = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class TuneConfig(BaseModel):
    """A hyperparameter study (Optuna) over any config keys."""

    model_config = _STRICT

    trials: int = Field(20, ge=1, description="Trials in the study.")
    workers: int = Field(1, ge=1, description="Worker processes on this machine.")
    timeout_s: float | None = Field(None, gt=0, description="Stop starting trials after this.")
    sampler: Literal["tpe", "random", "grid", "cmaes"] = Field("tpe", description="Sampler.")
    pruner: Literal["median", "hyperband", "successive_halving", "none"] = Field(
        "median", description="Pruner fed by each trial's periodic validation loss."
    )
    metric: str = Field("val_loss", min_length=1, description="Objective metric.")
    direction: Literal["minimize", "maximize"] = Field("minimize", description="Optimize how.")
    study_name: str | None = Field(
        None, pattern=NAME_PATTERN, description="Study name in the catalog. Unset: the config name."
    )
    space: dict[str, ParamSpec] = Field(
        default_factory=dict,
        description="Search space: dotted config key (e.g. train.lr, model.n_layer) → "
        "parameter spec with a 'type' (float, int, categorical).",
    )


# ---------------------------------------------------------------------------------------
# deployment optimization
# ---------------------------------------------------------------------------------------


class OptimizeConfig(BaseModel):
    """Compression and export; each output is a new model version."""

    model_config = _STRICT

    quantize: Literal["int8", "int4"] | None = Field(None, description="Quantize weights.")
    quantize_mode: Literal["dynamic", "weight_only"] = Field(
        "dynamic",
        description="int8 scheme: dynamic activations or weight-only (int4 is weight-only).",
    )
    prune: float | None = Field(
        None, ge=0, lt=1, description="Share of weights (or heads/channels) to remove."
    )
    prune_structured: bool = Field(
        False, description="Prune attention heads and MLP channels instead of single weights."
    )
    recovery_steps: int = Field(0, ge=0, description="Fine-tuning steps after pruning.")
    distill: Preset | None = Field(None, description="Distill into a student of this preset.")
    distill_steps: int = Field(1000, ge=1, description="Student training steps.")
    distill_temperature: float = Field(2.0, gt=0, description="Softmax temperature of the KL term.")
    distill_alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the KL term (1 - alpha on cross-entropy)."
    )
    export: Literal["onnx"] | None = Field(None, description="Export format.")
    budget: str | None = Field(
        None,
        pattern=r"^[A-Za-z][\w@.-]*\s*[+-]\s*\d+(\.\d+)?%?$",
        description="Quality budget, e.g. 'ppl+3%': pick the fastest variant within it.",
    )
    promote: bool = Field(False, description="Promote the variant the budget picks.")


# ---------------------------------------------------------------------------------------
# serving
# ---------------------------------------------------------------------------------------


class RateLimitConfig(BaseModel):
    """Per-key limits, the defaults of every key (``genloop keys set-limits`` overrides them
    per key); shared through Redis when serve.redis_url is set."""

    model_config = _STRICT

    requests_per_min: int | None = Field(600, ge=1, description="Requests per minute; unset: off.")
    tokens_per_min: int | None = Field(
        100_000, ge=1, description="Prompt + generated tokens per minute; unset: off."
    )
    tokens_per_day: int | None = Field(
        None,
        ge=1,
        description="Prompt + generated tokens per UTC day (a fixed window); unset: off.",
    )
    tokens_per_month: int | None = Field(
        None,
        ge=1,
        description="Prompt + generated tokens per UTC calendar month; unset: off.",
    )
    redis_prefix: str = Field(
        "genloop:rl:",
        min_length=1,
        max_length=64,
        description="Prefix of the Redis keys (deployments sharing one Redis use their own).",
    )
    on_redis_down: Literal["fail_closed", "local"] = Field(
        "fail_closed",
        description=(
            "With serve.redis_url, while Redis is unreachable: fail_closed refuses client "
            "requests with 503; local limits each process on its own. Either raises one alert."
        ),
    )


class ImageInputsConfig(BaseModel):
    """Images sent in chat messages (OpenAI ``image_url`` content parts) to captioning
    models: bounded, and from ``data:`` URIs only unless remote URLs are allowed."""

    model_config = _STRICT

    allow_remote: bool = Field(
        False,
        description=(
            "Fetch http(s) image URLs (through data collection's SSRF guard); off: only "
            "data: URIs, anything else is a 400."
        ),
    )
    allow_private_hosts: bool = Field(
        False,
        description="Remote image URLs may resolve to private or loopback addresses.",
    )
    max_bytes: int = Field(
        4 * MiB,
        ge=1,
        description=(
            "Largest encoded image (413 beyond); a data: URI also counts against "
            "serve.max_body_bytes."
        ),
    )
    max_pixels: int = Field(
        4096 * 4096, ge=1, description="Largest width × height, read from the header (413)."
    )
    max_images: int = Field(8, ge=1, le=64, description="Most images per request (413).")
    fetch_timeout_s: float = Field(10.0, gt=0, description="Limit for fetching a remote image.")


class VllmConfig(BaseModel):
    """The managed vLLM process (``serve.engine: vllm``): where it lives and how it runs.

    vLLM pins versions of transformers and fastapi that differ from genloop's, so it lives
    in its own virtual environment (``make vllm``) and genloop runs it as a process.
    """

    model_config = _STRICT

    python: Path | None = Field(
        None,
        description=(
            "Python of the vLLM environment; unset: $GENLOOP_VLLM_PYTHON, else "
            ".venv-vllm/bin/python (make vllm)."
        ),
    )
    startup_timeout_s: float = Field(
        600.0, gt=0, description="Longest wait for a vLLM process to answer its health check."
    )
    kv_cache_gib: float = Field(
        1.0, gt=0, description="KV cache per vLLM process on CPU (VLLM_CPU_KVCACHE_SPACE)."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of GPU memory a vLLM process may take (CUDA)."
    )
    max_restart_backoff_s: float = Field(
        60.0, gt=0, description="Longest wait between restarts of a vLLM process that died."
    )


_LOOPBACK_HOSTS = ("localhost",)


def _is_loopback(host: str) -> bool:
    import ipaddress

    host = host.lower()
    if host in _LOOPBACK_HOSTS or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class UpstreamConfig(BaseModel):
    """One upstream server: its URL and the credentials this server sends it.

    The caller's key never leaves this server: an upstream gets only its own key, read from
    the environment variable ``api_key_env`` or the workspace's encrypted secret store
    (``api_key_secret``, set with ``genloop secrets set NAME``); neither: no
    ``Authorization`` header at all.
    """

    model_config = _STRICT

    url: str = Field(description="OpenAI-compatible base URL, e.g. https://host:8000/v1.")
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the key sent to this upstream as "
        "'Authorization: Bearer …'; unset (and no api_key_secret): no key is sent.",
    )
    api_key_secret: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Name of the workspace secret (genloop secrets set NAME) holding the key "
        "sent to this upstream; instead of api_key_env.",
    )
    allow_http: bool = Field(
        False,
        description="Allow plain http to a host that is not loopback (keys and text then "
        "cross the network in clear).",
    )

    @model_validator(mode="after")
    def _one_key_source(self) -> UpstreamConfig:
        if self.api_key_env is not None and self.api_key_secret is not None:
            raise ValueError("give api_key_env or api_key_secret, not both")
        return self


class ServeConfig(BaseModel):
    """The HTTP server, its engine and its limits (safe by default)."""

    model_config = _STRICT

    host: str = Field("127.0.0.1", description="Bind address (loopback by default).")
    port: int = Field(8000, ge=0, le=65535, description="Port; 0 picks a free one.")
    models: list[str] = Field(
        default_factory=list, description="Model refs to serve, e.g. code-lm@production."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where models run.")
    engine: Literal["native", "vllm", "auto"] = Field(
        "native",
        description=(
            "Text backend: native (in process), vllm (a managed vLLM process per model "
            "version) or auto (native where the architecture is batched natively, else vLLM "
            "when its environment exists)."
        ),
    )
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="The managed vLLM process.")
    max_batch_size: int = Field(
        64,
        ge=1,
        description=(
            "Most sequences decoded together per model: the engine's KV cache slots. Each "
            "slot holds min(context, max_prompt_tokens + max_tokens) positions of layers × 2 "
            "× kv_heads × head_dim × dtype bytes; fewer slots are made when this many do "
            "not fit in kv_cache_bytes (printed at startup)."
        ),
    )
    kv_cache_bytes: int = Field(
        4 * GiB,
        ge=MiB,
        description=(
            "Memory budget of each model's KV cache (allocated, and resident, at load); "
            "it caps max_batch_size."
        ),
    )
    max_queue: int = Field(64, ge=0, description="Waiting requests before 429/503.")
    request_timeout_s: float = Field(60.0, gt=0, description="Limit per request.")
    drain_timeout_s: float = Field(30.0, ge=0, description="Grace period on SIGTERM.")
    max_prompt_tokens: int = Field(2048, ge=1, description="Longest prompt accepted.")
    max_tokens: int = Field(512, ge=1, description="Largest max_tokens accepted.")
    max_n: int = Field(8, ge=1, le=128, description="Largest n (choices per request).")
    max_stop: int = Field(4, ge=0, le=64, description="Most stop sequences per request.")
    max_embedding_inputs: int = Field(
        2048, ge=1, description="Most inputs in one /v1/embeddings request (413 beyond)."
    )
    max_embedding_tokens: int = Field(
        65_536,
        ge=1,
        description="Most tokens, all inputs together, in one /v1/embeddings request (413 beyond).",
    )
    embedding_batch_size: int = Field(
        64, ge=1, description="Most inputs per embedding forward pass (requests share them)."
    )
    embedding_batch_tokens: int = Field(
        16_384,
        ge=1,
        description="Most padded tokens (inputs × the longest) per embedding forward pass.",
    )
    embedding_batch_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="How long an idle embedding engine waits for more requests to join its "
        "next forward pass (0: none; under load they join anyway).",
    )
    max_body_bytes: int = Field(MiB, ge=1024, description="Largest request body.")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="Largest request header block.")
    max_concurrent_requests: int = Field(
        256, ge=1, description="HTTP requests in progress at once before 503 (/health exempt)."
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS; empty: CORS off."
    )
    ssl_certfile: Path | None = Field(None, description="TLS certificate (PEM).")
    ssl_keyfile: Path | None = Field(None, description="TLS private key (PEM).")
    metrics_public: bool = Field(False, description="Serve /metrics without a key.")
    ui: bool = Field(True, description="Serve the web UI at /.")
    store_requests: bool = Field(
        True, description="Keep prompts and responses (encrypted) so feedback can link to them."
    )
    upstreams: dict[str, list[UpstreamConfig]] = Field(
        default_factory=dict,
        description="Model name → upstream servers to route to, with failover: each a URL, "
        "or {url, api_key_env, allow_http}. The caller's key is never forwarded.",
    )
    upstream_health_interval_s: float = Field(
        10.0, gt=0, description="Seconds between upstream health checks."
    )
    redis_url: str | None = Field(
        None, description="Redis URL for rate limits shared by replicas; unset: in process."
    )
    rate_limit: RateLimitConfig = Field(
        default_factory=RateLimitConfig, description="Per-key rate limits."
    )
    image_inputs: ImageInputsConfig = Field(
        default_factory=ImageInputsConfig,
        description="Images in chat messages (for captioning models): sources and sizes.",
    )
    long_image_prompts: Literal["truncate", "refuse"] = Field(
        "truncate",
        description="A text-to-image prompt longer than the text encoder's context: cut, "
        "with a warning in the response, or refused with a 400.",
    )

    @model_validator(mode="after")
    def _tls_and_urls(self) -> ServeConfig:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together")
        for name, ups in self.upstreams.items():
            for i, up in enumerate(ups):
                _check_http_urls([up.url])
                parts = urlsplit(up.url)
                if parts.username is not None or parts.password is not None:
                    raise ValueError(
                        f"serve.upstreams.{name}[{i}]: {up.url!r} holds credentials; "
                        "put the key in an environment variable named by api_key_env"
                    )
                if (
                    up.url.startswith("http://")
                    and not up.allow_http
                    and not _is_loopback(parts.hostname or "")
                ):
                    raise ValueError(
                        f"serve.upstreams.{name}[{i}]: {up.url!r} is plain http to a host "
                        "that is not loopback; use https, or give this upstream "
                        "'allow_http: true' ({url: ..., allow_http: true})"
                    )
        return self

    @field_validator("upstreams", mode="before")
    @classmethod
    def _upstream_urls(cls, value: Any) -> Any:
        """A bare URL is ``{url: URL}`` (no key, https unless loopback)."""
        if isinstance(value, dict):
            return {
                name: [{"url": u} if isinstance(u, str) else u for u in ups]
                if isinstance(ups, list)
                else ups
                for name, ups in value.items()
            }
        return value


# ---------------------------------------------------------------------------------------
# monitoring, feedback, security
# ---------------------------------------------------------------------------------------


class MonitorConfig(BaseModel):
    """Drift and anomaly detection and where alerts go."""

    model_config = _STRICT

    psi_threshold: float = Field(0.2, gt=0, description="Alert when PSI exceeds this.")
    kl_threshold: float = Field(0.1, gt=0, description="Alert when KL divergence exceeds this.")
    reference_window: int = Field(
        500, ge=10, description="Requests in the first-traffic reference profile."
    )
    window: int = Field(500, ge=10, description="Recent requests compared with the reference.")
    check_interval_s: float = Field(60.0, gt=0, description="Seconds between drift checks.")
    ewma_alpha: float = Field(0.1, gt=0, le=1, description="Smoothing of latency/error EWMAs.")
    z_threshold: float = Field(4.0, gt=0, description="Anomaly when |z-score| exceeds this.")
    min_samples: int = Field(30, ge=1, description="Observations before anomalies can fire.")
    webhook_url: str | None = Field(None, description="POST alerts here as JSON.")
    auth_failures_per_min: float | None = Field(
        60.0,
        gt=0,
        description=(
            "Raise the auth_failures alert (key guessing) when more requests than this per "
            "minute are refused with 401, over auth_failure_window_s; unset: off."
        ),
    )
    auth_failure_window_s: float = Field(
        60.0, gt=0, le=3600, description="The sliding window the 401s are counted over."
    )
    bias_interval_s: float | None = Field(
        None, gt=0, description="Run the bias probes on the served model this often; unset: off."
    )
    purge_interval_s: float | None = Field(
        86400.0,
        gt=0,
        description=(
            "genloop serve purges data past security.retention_days this often (the first "
            "purge at start); unset: only `genloop privacy purge` does."
        ),
    )

    @field_validator("webhook_url")
    @classmethod
    def _http_only(cls, url: str | None) -> str | None:
        if url is not None:
            _check_http_urls([url])
        return url


_DURATION_RE = re.compile(r"^(\d+)([smhd])$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class RetrainConfig(BaseModel):
    """How a retrain fine-tunes the production model on feedback."""

    model_config = _STRICT

    method: Literal["lora", "full"] = Field("lora", description="LoRA adapters or all weights.")
    objective: Literal["sft", "dpo"] = Field("sft", description="Feedback as SFT or DPO pairs.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapters when method=lora.")
    lr: float = Field(1e-4, gt=0, description="Learning rate.")
    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Examples per batch.")


class FeedbackConfig(BaseModel):
    """Curation of user feedback and the retraining loop."""

    model_config = _STRICT

    min_items: int = Field(50, ge=1, description="New approved items that trigger a retrain.")
    per_user_cap: int = Field(20, ge=1, description="Most items one user may add to a set.")
    review_required: bool = Field(False, description="Items need approval before use.")
    replay_ratio: float = Field(
        0.5, ge=0, lt=1, description="Share of the retraining mix taken from original data."
    )
    retrain: RetrainConfig = Field(default_factory=RetrainConfig, description="Fine-tuning.")
    schedule: str | None = Field(
        None,
        pattern=_DURATION_RE.pattern,
        description="Also retrain on this interval, e.g. '6h', '1d'; unset: only on min_items.",
    )
    poll_interval_s: float = Field(60.0, gt=0, description="How often the loop checks.")
    max_backoff_s: float = Field(3600.0, gt=0, description="Longest wait after failures.")

    @property
    def schedule_seconds(self) -> int | None:
        """``schedule`` in seconds (``None`` when unset)."""
        if self.schedule is None:
            return None
        m = _DURATION_RE.match(self.schedule)
        assert m is not None  # the field pattern guarantees it
        return int(m.group(1)) * _DURATION_UNITS[m.group(2)]


class GuardrailsConfig(BaseModel):
    """Checks applied to every request and response."""

    model_config = _STRICT

    blocklist_input: list[str] = Field(
        default_factory=list, description="Refuse prompts containing any of these."
    )
    blocklist_output: list[str] = Field(
        default_factory=list, description="Withhold outputs containing any of these."
    )
    redact_pii_in_logs: bool = Field(True, description="Redact PII before logging.")
    injection_heuristics: bool = Field(True, description="Flag likely prompt injections.")
    max_repetition: int | None = Field(
        16, ge=2, description="Cut output once a line or n-gram repeats this often; unset: off."
    )
    on_violation: Literal["refuse", "flag"] = Field(
        "refuse", description="Refuse the request, or only flag it in the log."
    )


class SecurityConfig(BaseModel):
    """Retention and guardrails."""

    model_config = _STRICT

    retention_days: int | None = Field(
        90, ge=1, description="Purge stored requests and feedback after this; unset: keep."
    )
    guardrails: GuardrailsConfig = Field(
        default_factory=GuardrailsConfig, description="Request and response checks."
    )


# ---------------------------------------------------------------------------------------
# the whole file
# ---------------------------------------------------------------------------------------


PART_PREFIX = "part:"  # a model ref naming a part of the same config: part:vae


class PartConfig(BaseModel):
    """A model the config trains before its own, on the same data (Stable Diffusion's
    recipe: the autoencoder, then the text encoder, then the UNet that uses both). The
    main model (or a later part) names it by ``part:NAME`` wherever it takes a model ref;
    it is registered as ``<name>-<part>``."""

    model_config = _STRICT

    model: ModelConfig = Field(description="The part's family and size.")
    train: TrainConfig = Field(description="The part's training loop.")

    @model_validator(mode="after")
    def _objective_fits(self) -> PartConfig:
        _check_objective(self.model.family, self.train.objective)
        return self


def _check_objective(family: str, objective: str) -> None:
    if family not in OBJECTIVE_FAMILIES[objective]:
        fits = [o for o, families in OBJECTIVE_FAMILIES.items() if family in families]
        raise ValueError(
            f"train.objective {objective!r} does not fit model.family {family!r} "
            f"(it trains {', '.join(OBJECTIVE_FAMILIES[objective])}; {family} trains with "
            f"{', '.join(fits)})"
        )


def part_references(model: ModelConfig) -> list[str]:
    """The part names ``model`` refers to (``part:NAME`` in any of its string fields)."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str) and value.startswith(PART_PREFIX):
            found.append(value[len(PART_PREFIX) :])
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(model.model_dump())
    return found


class GenloopConfig(BaseModel):
    """A genloop pipeline file: one optional section per stage."""

    model_config = _STRICT

    name: str | None = Field(
        None, pattern=NAME_PATTERN, description="Pipeline name; the model registered uses it."
    )
    workspace: WorkspaceConfig = Field(
        default_factory=WorkspaceConfig, description="Catalog and artifact store."
    )
    data: DataConfig | None = Field(None, description="Dataset to prepare (the data stage).")
    tokenizer: TokenizerConfig = Field(
        default_factory=TokenizerConfig, description="Tokenizer for text."
    )
    parts: dict[str, PartConfig] = Field(
        default_factory=dict,
        description="Models trained first, in order, on the same data; the model (or a later "
        "part) names one as part:NAME where it takes a model ref. Registered as NAME-PART.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model family and size.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    gate: GateConfig = Field(default_factory=GateConfig, description="Release gate rules.")
    tune: TuneConfig | None = Field(None, description="Hyperparameter study (replaces train).")
    optimize: OptimizeConfig | None = Field(None, description="Compression and export.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serving.")
    monitor: MonitorConfig = Field(default_factory=MonitorConfig, description="Monitoring.")
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig, description="Feedback loop.")
    security: SecurityConfig = Field(
        default_factory=SecurityConfig, description="Retention and guardrails."
    )

    @model_validator(mode="after")
    def _across_sections(self) -> GenloopConfig:
        _check_objective(self.model.family, self.train.objective)
        earlier: list[str] = []
        for part, section in self.parts.items():
            if not re.match(NAME_PATTERN, part):
                raise ValueError(f"parts: {part!r} is not a valid name (letters, digits, ._-)")
            _check_part_references(f"parts.{part}.model", section.model, earlier)
            earlier.append(part)
        _check_part_references("model", self.model, earlier)
        _check_mask_token(self)
        ctx = self.model.context_length
        if ctx is not None and self.tokenizer.seq_len > ctx:
            raise ValueError(
                f"tokenizer.seq_len ({self.tokenizer.seq_len}) exceeds model.context_length ({ctx})"
            )
        if self.tune is not None:
            for key in self.tune.space:
                if not _has_field(GenloopConfig, key.split(".")):
                    raise ValueError(f"tune.space key {key!r} is not a config key")
        return self


def _check_mask_token(cfg: GenloopConfig) -> None:
    """Masked-LM pretraining on a BPE this config trains needs a mask token among its
    special tokens (the tokenizer of an existing dataset is checked when training starts)."""
    sections = [(cfg.model, cfg.train), *((p.model, p.train) for p in cfg.parts.values())]
    pretrains = any(
        m.family == "masked_lm" and t.objective == "mlm" and t.dataset is None for m, t in sections
    )
    if (
        pretrains
        and cfg.data is not None
        and cfg.tokenizer.kind == "bpe"
        and not set(MASK_TOKENS) & set(cfg.tokenizer.special_tokens)
    ):
        raise ValueError(
            "masked_lm pretraining (train.objective mlm) masks tokens, so the tokenizer needs "
            'a mask token: add "<|mask|>" to tokenizer.special_tokens'
        )


def _check_part_references(where: str, model: ModelConfig, earlier: list[str]) -> None:
    for name in part_references(model):
        if name not in earlier:
            known = ", ".join(earlier) or "none defined before it"
            raise ValueError(f"{where} names part:{name}, which is not a part ({known})")


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and reads ``3e-4`` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (``3.0e-4``); YAML 1.2 and every
    reader of these files expect ``3e-4`` to be a number too.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a scalar", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader is a yaml.SafeLoader)


def _yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    detail = f"{problem} ({context})" if context else problem
    return f"{where}: {' '.join(str(detail).split())}"


@overload
def load_config(path: str | Path, overrides: Sequence[str] = ()) -> GenloopConfig: ...
@overload
def load_config(path: str | Path, overrides: Sequence[str], cls: type[M]) -> M: ...
@overload
def load_config(path: str | Path, overrides: Sequence[str] = (), *, cls: type[M]) -> M: ...
def load_config(
    path: str | Path, overrides: Sequence[str] = (), cls: type[BaseModel] = GenloopConfig
) -> BaseModel:
    """Read a YAML config file, apply ``--set`` overrides and validate it as ``cls``.

    Every problem is one :class:`ConfigError` line naming the file and the key.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"config path is a directory, not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {path}{_yaml_error(exc)}") from None
    if data is None:  # an empty file: every default
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections at the top level, "
            f"not a {_yaml_type(data)}"
        )
    return parse_config(data, overrides, cls, source=str(path))


@overload
def parse_config(
    data: dict[str, Any], overrides: Sequence[str] = (), *, source: str = "<config>"
) -> GenloopConfig: ...
@overload
def parse_config(
    data: dict[str, Any], overrides: Sequence[str], cls: type[M], source: str = "<config>"
) -> M: ...
@overload
def parse_config(
    data: dict[str, Any],
    overrides: Sequence[str] = (),
    *,
    cls: type[M],
    source: str = "<config>",
) -> M: ...
def parse_config(
    data: dict[str, Any],
    overrides: Sequence[str] = (),
    cls: type[BaseModel] = GenloopConfig,
    source: str = "<config>",
) -> BaseModel:
    """Apply overrides to an already-read mapping and validate it as ``cls``.

    ``source`` names where the mapping came from in error messages.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping at the top level, not {_yaml_type(data)}")
    data = apply_overrides(data, overrides)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, cls, source, overrides)) from None


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b.c=value`` override set.

    The value is read as YAML (``3``, ``3e-4``, ``true``, ``null``, ``[1, 2]``,
    ``{a: 1}``); missing mappings on the way are created, integer segments index into
    existing lists. Whether the key exists is left to validation, which names it.
    """
    result = copy.deepcopy(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not p.strip() for p in parts):
            raise ConfigError(
                f"malformed override {override!r}: expected KEY=VALUE, e.g. train.lr=3e-4"
            )
        parts = [p.strip() for p in parts]
        try:
            value = _yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid value in override {override!r}{_yaml_error(exc)}") from None
        node: Any = result
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                index = _list_index(node, part, override, ".".join(parts[: i + 1]))
                if last:
                    node[index] = value
                elif node[index] is None:
                    node[index] = {}
                node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                elif node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                raise ConfigError(
                    f"cannot apply override {override!r}: {'.'.join(parts[:i])!r} is a "
                    f"{_yaml_type(node)}, not a mapping"
                )
    return result


def _list_index(node: list[Any], part: str, override: str, here: str) -> int:
    try:
        index = int(part)
    except ValueError:
        raise ConfigError(
            f"cannot apply override {override!r}: {here!r} indexes a list, so it must be a number"
        ) from None
    if not -len(node) <= index < len(node):
        raise ConfigError(
            f"cannot apply override {override!r}: index {index} is out of range "
            f"(the list has {len(node)} item{'' if len(node) == 1 else 's'})"
        )
    return index


def config_schema() -> dict[str, Any]:
    """JSON Schema of :class:`GenloopConfig`, for editors (descriptions included)."""
    schema = GenloopConfig.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# ---------------------------------------------------------------------------------------
# error messages
# ---------------------------------------------------------------------------------------

_MAX_ERRORS = 10


def _format_errors(
    exc: ValidationError, cls: type[BaseModel], source: str, overrides: Sequence[str]
) -> str:
    set_keys = [(o, [p.strip() for p in o.partition("=")[0].split(".")]) for o in overrides]
    lines = []
    errors = exc.errors(include_url=False)
    for err in errors[:_MAX_ERRORS]:
        loc = tuple(err["loc"])
        shown, raw = _walk(cls, loc)
        where = source
        for override, parts in set_keys:
            if [str(p) for p in raw[: len(parts)]] == parts:
                where = f"--set {override}"
        kind = err["type"]
        if kind == "extra_forbidden":
            lines.append(_unknown_key(cls, loc, shown, where))
        elif kind == "invalid_key":  # a YAML key like 1, true or null
            under = _walk(cls, loc[:-1])[0]
            at = f" under '{under}'" if under else ""
            lines.append(f"invalid key {err['input']!r}{at} in {where}: keys must be strings")
        elif kind == "missing" and loc and isinstance(loc[-1], int):  # a short tuple
            parent = _walk(cls, loc[:-1])[0]
            got = _got(err.get("input"), kind)
            lines.append(f"invalid value for '{parent}' in {where}: item {loc[-1]} is missing{got}")
        elif kind == "missing":
            lines.append(f"missing required key '{shown}' in {where}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if kind == "union_tag_not_found":
                tags = ", ".join(_tags(_type_at(cls, loc)))
                tag_key = str(err["ctx"]["discriminator"]).strip("'")
                msg = f"missing '{tag_key}' (one of: {tags})"
            if kind == "union_tag_invalid":
                msg += _suggest(str(err["ctx"]["tag"]), _tags(_type_at(cls, loc)))
            label = f"value for '{shown}'" if shown else "config"
            got = _got(err.get("input"), kind)
            lines.append(f"invalid {label} in {where}: {msg}{got}")
    if len(errors) > _MAX_ERRORS:
        lines.append(f"and {len(errors) - _MAX_ERRORS} more errors")
    return re.sub(r"\s*\n\s*", " ", "; ".join(lines))  # one line, whatever the messages hold


def _unknown_key(cls: type[BaseModel], loc: tuple[Any, ...], shown: str, where: str) -> str:
    parent = _type_at(cls, loc[:-1])
    valid = sorted({f for m in _members(parent) if _is_model(m) for f in m.model_fields})
    key = str(loc[-1])
    prefix = shown[: -len(key)] if shown.endswith(key) else ""
    notes = []
    close = _close_match(key, valid)
    if close:
        notes.append(f"did you mean '{prefix}{close}'?")
    if valid:
        notes.append("valid keys: " + ", ".join(valid))
    detail = f" ({'; '.join(notes)})" if notes else ""
    return f"unknown key '{shown}' in {where}{detail}"


def _close_match(word: str, options: Sequence[str]) -> str | None:
    """The option that looks most like ``word``: its initials (learning_rate → lr), else the
    closest spelling."""
    initials = "".join(w[0] for w in re.split(r"[_\-\s]+", word.lower()) if w)
    if len(initials) > 1 and initials in options:
        return initials
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return close[0] if close else None


def _suggest(word: str, options: Sequence[str]) -> str:
    close = _close_match(word, options)
    return f" (did you mean {close!r}?)" if close else ""


def _got(value: Any, kind: str) -> str:
    if isinstance(value, dict | BaseModel):
        # a field that wanted a scalar got a mapping; model-level checks get the whole mapping
        scalar = kind.endswith("_type") and not kind.startswith(("model", "dict"))
        return " (got a mapping)" if scalar else ""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f" (got {text})"


def _yaml_type(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    return type(value).__name__


# Walking the model classes along an error's ``loc``: pydantic's loc holds field names,
# list indexes, dict keys and, for a discriminated union, the tag of the chosen member.


def _members(tp: Any) -> list[Any]:
    """The alternatives of a type, with Annotated and None stripped."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _members(get_args(tp)[0])
    if origin is Union or origin is types.UnionType:
        return [m for arg in get_args(tp) if arg is not type(None) for m in _members(arg)]
    return [tp]


def _is_model(tp: Any) -> TypeGuard[type[BaseModel]]:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _tags(tp: Any) -> list[str]:
    """The discriminator values of a union's model members (``type`` fields)."""
    tags = []
    for m in _members(tp):
        if _is_model(m) and "type" in m.model_fields:
            tags += [str(a) for a in get_args(m.model_fields["type"].annotation)]
    return tags


def _step(tp: Any, elem: Any) -> tuple[Any, str | None]:
    """The type one ``loc`` element further in, and how the element shows in a key path
    (``None`` for a union tag, which is not part of the key)."""
    members = _members(tp)
    if len(members) > 1:
        for m in members:
            if isinstance(elem, str) and _is_model(m) and elem in _tags(m):
                return m, None
        return tp, None  # some other union branch label: stay on the whole union
    t = members[0] if members else None
    origin = get_origin(t)
    if _is_model(t):
        field = t.model_fields.get(str(elem))
        return (field.annotation if field else None), str(elem)
    if origin in (list, tuple, set, frozenset) and isinstance(elem, int):
        args = [a for a in get_args(t) if a is not Ellipsis]
        sub = args[elem] if origin is tuple and len(args) > elem else (args[0] if args else None)
        return sub, f"[{elem}]"
    if origin is dict:
        key_value = get_args(t)
        return (key_value[1] if len(key_value) == 2 else None), str(elem)
    return None, str(elem)


def _walk(cls: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, list[Any]]:
    """Show ``loc`` as a key path (``data.sources[0].paths``) and as raw key segments."""
    tp: Any = cls
    shown = ""
    raw: list[Any] = []
    for elem in loc:
        tp, part = _step(tp, elem)
        if part is None:
            continue
        raw.append(elem)
        if part.startswith("["):
            shown += part
        elif re.fullmatch(r"[A-Za-z_][\w-]*", part) or not shown:
            shown += f".{part}" if shown else part
        else:
            shown += f'["{part}"]'
    return shown, raw


def _type_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    tp: Any = cls
    for elem in loc:
        tp, _ = _step(tp, elem)
    return tp


def _has_field(cls: type[BaseModel], parts: Sequence[str]) -> bool:
    """Whether a dotted key names a field (through nested sections)."""
    tp: Any = cls
    for part in parts:
        members = [m for m in _members(tp) if _is_model(m)]
        if len(members) != 1 or part not in members[0].model_fields:
            return False
        tp = members[0].model_fields[part].annotation
    return True
