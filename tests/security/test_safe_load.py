"""Weights load from safetensors only: a pickle that would run code never runs, whatever
loader it reaches, whatever it is called, trusted or not."""

from __future__ import annotations

import ast
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from genloop.errors import GenloopError
from genloop.security.safe_load import (
    UnsafeWeightsError,
    check_weights_dir,
    load_safetensors,
    load_state_dict,
    sniff,
)

SRC = Path(__file__).parents[2] / "src" / "genloop"


class WritesMarker:
    """Unpickling this writes a file: a stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _write_pickle(path: Path, marker: Path, how: str) -> Path:
    payload = {"weight": WritesMarker(marker)}
    if how == "torch-zip":  # what torch.save writes
        torch.save(payload, path)
    else:
        with path.open("wb") as f:
            pickle.dump(payload, f, protocol=0 if how == "protocol0" else 2)
    return path


PAYLOADS = [
    ("pytorch_model.bin", "protocol2"),
    ("model.pt", "torch-zip"),
    ("weights.pkl", "protocol0"),
    ("model.safetensors", "protocol2"),  # a pickle in disguise
    ("weights.dat", "torch-zip"),  # no telling name at all
]


def test_the_payload_is_live(tmp_path: Path) -> None:
    """The control: plain unpickling does run the payload (so the tests below mean it)."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(WritesMarker(marker)))
    assert marker.exists()


@pytest.mark.parametrize(("name", "how"), PAYLOADS)
@pytest.mark.parametrize("trust_pickle", [False, True])
def test_load_state_dict_never_runs_a_pickle(
    tmp_path: Path, name: str, how: str, trust_pickle: bool
) -> None:
    marker = tmp_path / "pwned"
    path = _write_pickle(tmp_path / name, marker, how)
    with pytest.raises(GenloopError) as info:
        load_state_dict(path, trust_pickle=trust_pickle)
    assert not marker.exists()
    assert ("weights_only" if trust_pickle else "--trust-pickle") in str(info.value)


@pytest.mark.parametrize(("name", "how"), PAYLOADS)
def test_load_safetensors_refuses_anything_else(tmp_path: Path, name: str, how: str) -> None:
    marker = tmp_path / "pwned"
    path = _write_pickle(tmp_path / name, marker, how)
    with pytest.raises(GenloopError):
        load_safetensors(path)
    assert not marker.exists()


def test_files_are_judged_by_their_bytes(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    save_file({"w": torch.ones(2)}, tmp_path / "real.bin")  # safetensors under a pickle name
    assert sniff(tmp_path / "real.bin") == "safetensors"
    assert load_state_dict(tmp_path / "real.bin")["w"].tolist() == [1.0, 1.0]
    assert sniff(_write_pickle(tmp_path / "a.safetensors", marker, "protocol2")) == "pickle"
    assert sniff(_write_pickle(tmp_path / "b.dat", marker, "torch-zip")) == "pickle"
    (tmp_path / "c.dat").write_bytes(b"\x00" * 64)
    assert sniff(tmp_path / "c.dat") == "unknown"
    assert not marker.exists()


def test_plain_tensor_pickles_load_only_when_trusted(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.arange(3.0)}, path)
    with pytest.raises(UnsafeWeightsError, match=r"pickle-based.*--trust-pickle"):
        load_state_dict(path)
    assert load_state_dict(path, trust_pickle=True)["w"].tolist() == [0.0, 1.0, 2.0]


def test_a_weights_directory_with_pickles_is_refused(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    save_file({"w": torch.ones(1)}, tmp_path / "model.safetensors")
    assert check_weights_dir(tmp_path) == []
    _write_pickle(tmp_path / "sub" / "extra.pt", tmp_path / "pwned", "torch-zip")
    with pytest.raises(UnsafeWeightsError, match=r"extra\.pt"):
        check_weights_dir(tmp_path)
    assert [p.name for p in check_weights_dir(tmp_path, trust_pickle=True)] == ["extra.pt"]


# ------------------------------------------------------------- every loader in genloop


def _llama() -> Any:
    from genloop.models.causal_lm import FAMILY

    torch.manual_seed(0)
    return FAMILY.build(
        {
            "preset": "tiny",
            "vocab_size": 64,
            "n_layer": 1,
            "n_embd": 32,
            "n_head": 2,
            "context_length": 16,
        }
    )


def _hf_dir_with_pickle(tmp_path: Path, marker: Path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    _llama().config.save_pretrained(d)
    _write_pickle(d / "pytorch_model.bin", marker, "torch-zip")
    return d


def _hf_dir_with_disguised_pickle(tmp_path: Path, marker: Path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    _llama().config.save_pretrained(d)
    _write_pickle(d / "model.safetensors", marker, "protocol2")
    return d


def _vae_dir_with_disguised_pickle(tmp_path: Path, marker: Path) -> Path:
    from genloop.models.family import get_family
    from genloop.workspace.manifest import MANIFEST, write_manifest

    family = get_family("vae")
    model = family.build({"image_size": 8, "channels": 1, "latent_dim": 2, "base_channels": 4})
    d = family.save(model, tmp_path / "vae")
    _write_pickle(d / "model.safetensors", marker, "protocol2")
    (d / MANIFEST).unlink(missing_ok=True)
    write_manifest(d)  # an attacker who can write the files can write the manifest too
    return d


def _adapter_dir_with_pickle(tmp_path: Path, marker: Path) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    _write_pickle(d / "adapter_model.bin", marker, "torch-zip")
    return d


def _load_family(family: str, trust: bool) -> Callable[[Path], Any]:
    from genloop.models.family import get_family

    return lambda p: get_family(family).load(p, trust_pickle=trust)


def _load_pretrained(trust: bool) -> Callable[[Path], Any]:
    from genloop.models.pretrained import load_pretrained

    return lambda p: load_pretrained(p, trust_pickle=trust)


def _load_adapter(p: Path) -> Any:
    from genloop.models.lora import load_adapter

    return load_adapter(_llama(), p)


Maker = Callable[[Path, Path], Path]
LOADERS: list[tuple[str, Maker, Callable[[], Callable[[Path], Any]], str]] = [
    ("pretrained", _hf_dir_with_pickle, lambda: _load_pretrained(False), "pickle-based"),
    ("pretrained-trusted", _hf_dir_with_pickle, lambda: _load_pretrained(True), "weights_only"),
    (
        "pretrained-disguised",
        _hf_dir_with_disguised_pickle,
        lambda: _load_pretrained(True),
        "model.safetensors is a pickle-based file",
    ),
    ("causal_lm", _hf_dir_with_pickle, lambda: _load_family("causal_lm", False), "pickle-based"),
    (
        "causal_lm-trusted",
        _hf_dir_with_pickle,
        lambda: _load_family("causal_lm", True),
        "weights_only",
    ),
    (
        "vae-trusted",
        _vae_dir_with_disguised_pickle,
        lambda: _load_family("vae", True),
        "unreadable weights",
    ),
    ("lora-adapter", _adapter_dir_with_pickle, lambda: _load_adapter, "safetensors only"),
]


@pytest.mark.parametrize(
    ("make", "loader", "reason"), [x[1:] for x in LOADERS], ids=[x[0] for x in LOADERS]
)
def test_every_model_loader_refuses_the_pickle(
    tmp_path: Path, make: Maker, loader: Callable[[], Callable[[Path], Any]], reason: str
) -> None:
    marker = tmp_path / "pwned"
    directory = make(tmp_path, marker)
    with pytest.raises(GenloopError, match=reason):
        loader()(directory)
    assert not marker.exists()


def test_a_truncated_safetensors_file_is_refused_by_name(tmp_path: Path) -> None:
    from genloop.models.causal_lm import FAMILY
    from genloop.models.pretrained import load_pretrained

    d = FAMILY.save(_llama(), tmp_path / "ckpt")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(GenloopError, match="truncated or corrupt"):
        load_pretrained(d)


def test_nothing_in_genloop_unpickles_outside_safe_load() -> None:
    """A guard for the future: torch.load and pickle.load(s) are called in safe_load.py
    alone, and nothing passes weights_only=False."""
    modules = {"torch", "pickle", "dill", "joblib", "cloudpickle", "_pickle"}
    offenders = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            unpickles = (
                isinstance(func, ast.Attribute)
                and func.attr in ("load", "loads", "Unpickler")
                and isinstance(func.value, ast.Name)
                and func.value.id in modules
            )
            unsafe = any(
                k.arg == "weights_only"
                and isinstance(k.value, ast.Constant)
                and k.value.value is False
                for k in node.keywords
            )
            if unsafe or (unpickles and path.name != "safe_load.py"):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert offenders == []


def test_training_takes_a_pickle_base_model_only_with_trust_pickle(
    workspace: Any, tmp_path: Path
) -> None:
    from genloop.config import GenloopConfig
    from genloop.train.text import build_model

    base = _llama()
    d = tmp_path / "base"
    d.mkdir()
    base.config.save_pretrained(d)
    torch.save(base.state_dict(), d / "pytorch_model.bin")
    cfg = GenloopConfig.model_validate(
        {"model": {"family": "causal_lm", "base_model": str(d)}, "train": {"objective": "lm"}}
    )
    with pytest.raises(GenloopError, match=r"pickle-based weights.*--trust-pickle"):
        build_model(workspace, cfg.model, None, torch.device("cpu"))
    model, _, _ = build_model(workspace, cfg.model, None, torch.device("cpu"), trust_pickle=True)
    for (name, p), q in zip(model.state_dict().items(), base.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_the_train_command_offers_trust_pickle(genloop_cli: Any, tmp_path: Path) -> None:
    result = genloop_cli(tmp_path, "train", "--help")
    assert "--trust-pickle" in result.stdout
