"""``genloop models import`` as a user runs it, and the imported version in every stage.

The checkpoints are what users bring: tiny Qwen2 and GPT-2 causal LMs and a T5 seq2seq,
built from transformers' config classes (random weights, fixed seed) and saved by
``save_pretrained`` with a small byte-level BPE tokenizer. Broken ones are made from them
file by file. A refused import must name the file at fault and leave the catalog and the
artifact store exactly as they were. The imported Qwen2 then goes through serve (a real
HTTP request on loopback through the openai client), generate, eval, optimize, tune and
train with LoRA, each run as a user runs it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from genloop.models.importer import default_name, import_checkpoint
from genloop.workspace import Workspace, init_workspace, registry

from ..conftest import CliResult, run_genloop, write_corpus
from ..serve.conftest import CORPUS, make_keys, running_server, serve_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("one_torch_thread", "no_report_plots"),
]

QWEN = "Tiny Qwen2"  # a directory name with a space: imported as Tiny-Qwen2
QWEN_REF = "Tiny-Qwen2@1"
CARD = "---\nlicense: apache-2.0\nlanguage: en\n---\n# Tiny Qwen2\n\nA test model.\n"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoint directories as transformers writes them: ``qwen`` (with a model card),
    ``qwen_sharded`` (three shards and an index), ``gpt2`` and ``t5``."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Qwen2Config,
        Qwen2ForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )
    from transformers.utils import logging as hf_logging

    from genloop.data.tokenizer import load_hf_tokenizer, train_bpe

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    root = tmp_path_factory.mktemp("checkpoints")
    tok = load_hf_tokenizer(train_bpe(CORPUS, root / "tok", vocab_size=320, min_frequency=1))
    ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            **ids,
        )
    )
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128, **ids)
    )
    t5 = T5ForConditionalGeneration(
        T5Config(
            vocab_size=len(tok),
            d_model=32,
            d_ff=64,
            d_kv=16,
            num_layers=2,
            num_heads=2,
            decoder_start_token_id=tok.pad_token_id,
            **ids,
        )
    )
    dirs = {"qwen": root / QWEN, "qwen_sharded": root / "qwen-sharded"}
    qwen.save_pretrained(dirs["qwen"])
    qwen.save_pretrained(dirs["qwen_sharded"], max_shard_size="40KB")
    for name, model in (("gpt2", gpt2), ("t5", t5)):
        dirs[name] = root / f"tiny-{name}"
        model.save_pretrained(dirs[name])
    for path in dirs.values():
        tok.save_pretrained(path)
    (dirs["qwen"] / "README.md").write_text(CARD, encoding="utf-8")
    assert len(list(dirs["qwen_sharded"].glob("model-*.safetensors"))) == 3
    return dirs


@pytest.fixture(scope="module")
def ws(
    tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]
) -> Iterator[Workspace]:
    """A workspace with the Qwen2 checkpoint imported (``Tiny-Qwen2@1``) and a dataset,
    ``notes``, tokenized with that checkpoint's own tokenizer."""
    from genloop.config import DataConfig, TokenizerConfig
    from genloop.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("import_ws")
    workspace = init_workspace(root / "ws")
    ran = run_genloop(workspace, "models", "import", checkpoints["qwen"])
    assert ran.returncode == 0, ran.stderr
    data = DataConfig.model_validate(
        {
            "name": "notes",
            "sources": [{"type": "files", "paths": [str(write_corpus(root / "corpus"))]}],
            "split": {"val": 0.1, "test": 0.1},
            "workers": 1,
        }
    )
    tokenizer = TokenizerConfig(kind="pretrained", path=checkpoints["qwen"], seq_len=32)
    prepare_dataset(workspace, data, tokenizer)
    yield workspace
    workspace.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def state(ws: Workspace) -> tuple[list[str], list[str]]:
    """What an import may change: the registered versions and every file in the store."""
    refs = [i.ref for i in registry.list_models(ws)]
    files = sorted(str(p.relative_to(ws.store.root)) for p in ws.store.root.rglob("*"))
    return refs, files


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(file))
    return out


# ------------------------------------------------------------------------------ importing


def test_import_registers_a_version_with_its_lineage(
    ws: Workspace, checkpoints: dict[str, Path]
) -> None:
    source = checkpoints["qwen"]
    info = registry.resolve(ws, QWEN_REF)
    assert info.family == "causal_lm" and info.tags == {"source": "import"}
    lineage = info.config["import"]
    assert lineage["source"] == str(source.resolve())
    assert lineage["model_type"] == "qwen2" and lineage["architecture"] == "Qwen2ForCausalLM"
    assert lineage["license"] == "apache-2.0" and lineage["model_card"] == CARD
    expected = {p.name: sha256(p) for p in source.iterdir()}
    assert lineage["files"] == expected  # every file, hashed as it was read
    tensors = load_file(source / "model.safetensors")
    assert lineage["parameters"] == sum(t.numel() for t in tensors.values())

    artifact = registry.artifact_path(ws, QWEN_REF)  # the manifest verifies
    for name, digest in expected.items():
        assert sha256(artifact / name) == digest
    assert json.loads((artifact / "genloop.json").read_text())["family"] == "causal_lm"

    shown = run_genloop(ws, "models", "show", QWEN_REF)
    assert shown.returncode == 0, shown.stderr
    for text in (f"imported from: {source.resolve()}", "Qwen2ForCausalLM", "apache-2.0"):
        assert text in shown.stdout
    assert f"parameters: {lineage['parameters']:,}" in shown.stdout
    card = run_genloop(ws, "models", "show", QWEN_REF, "--card")
    assert card.returncode == 0 and "A test model." in card.stdout


def test_import_prints_the_ref_and_how_to_serve_it(
    ws: Workspace, checkpoints: dict[str, Path]
) -> None:
    ran = run_genloop(ws, "models", "import", checkpoints["t5"], "--name", "t5-small")
    assert ran.returncode == 0, ran.stderr
    assert "imported t5-small@1: T5ForConditionalGeneration (seq2seq)" in ran.stdout
    assert "genloop serve -m t5-small@1" in ran.stdout
    again = run_genloop(ws, "models", "import", checkpoints["t5"], "--name", "t5-small", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["ref"] == "t5-small@2"


@pytest.mark.parametrize(
    ("directory", "name"),
    [
        ("Qwen2.5 0.5B Instruct", "Qwen2.5-0.5B-Instruct"),
        ("_llama-3 (copy)", "llama-3-copy"),
        ("model.", "model"),
        ("models--Qwen--Qwen2.5-0.5B/snapshots/0123abcd", "Qwen2.5-0.5B"),
    ],
)
def test_default_name_is_the_directory_name_made_valid(
    tmp_path: Path, directory: str, name: str
) -> None:
    assert default_name(tmp_path / directory) == name


def test_sharded_checkpoint_imports_whole(ws: Workspace, checkpoints: dict[str, Path]) -> None:
    source = checkpoints["qwen_sharded"]
    ran = run_genloop(ws, "models", "import", source, "--name", "sharded")
    assert ran.returncode == 0, ran.stderr
    artifact = registry.artifact_path(ws, "sharded@1")
    assert (artifact / "model.safetensors.index.json").is_file()
    assert len(list(artifact.glob("model-*.safetensors"))) == 3
    imported, original = weights(artifact), weights(checkpoints["qwen"])
    assert imported.keys() == original.keys()
    assert all(torch.equal(imported[k], original[k]) for k in original)
    lineage = registry.resolve(ws, "sharded@1").config["import"]
    assert lineage["parameters"] == sum(t.numel() for t in original.values())


def test_a_hub_cache_snapshot_of_links_imports_as_files(
    ws: Workspace, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """The hub cache keeps each file once, in blobs/; a snapshot folder links to them."""
    repo = tmp_path / "hub" / "models--acme--tiny-chat"
    snapshot = repo / "snapshots" / "4f1c2e"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in checkpoints["qwen_sharded"].iterdir():
        blob = repo / "blobs" / sha256(file)
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("../..") / "blobs" / blob.name)
    ran = run_genloop(ws, "models", "import", snapshot)
    assert ran.returncode == 0, ran.stderr
    artifact = registry.artifact_path(ws, "tiny-chat@1")
    assert not [p for p in artifact.iterdir() if p.is_symlink()]
    assert weights(artifact).keys() == weights(checkpoints["qwen"]).keys()


def test_pickle_weights_are_refused_or_converted_with_trust_pickle(
    ws: Workspace, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import GPT2LMHeadModel

    source = tmp_path / "gpt2-bin"
    shutil.copytree(checkpoints["gpt2"], source)
    (source / "model.safetensors").unlink()
    model = GPT2LMHeadModel.from_pretrained(checkpoints["gpt2"])
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    before = state(ws)

    refused = run_genloop(ws, "models", "import", source)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "pytorch_model.bin" in refused.stderr and "--trust-pickle" in refused.stderr
    assert state(ws) == before

    ran = run_genloop(ws, "models", "import", source, "--trust-pickle")
    assert ran.returncode == 0, ran.stderr
    assert "converted pytorch_model.bin to safetensors" in ran.stdout
    artifact = registry.artifact_path(ws, "gpt2-bin@1")
    assert not [p.name for p in artifact.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    converted = weights(artifact)
    for key, value in model.state_dict().items():
        if key in converted:  # the tied lm_head is stored once, as transformers does
            assert torch.equal(converted[key], value), key
    lineage = registry.resolve(ws, "gpt2-bin@1").config["import"]
    assert lineage["converted_from_pickle"] == ["pytorch_model.bin"]
    assert lineage["files"]["model.safetensors"] == sha256(artifact / "model.safetensors")


def test_a_slow_tokenizer_gets_its_tokenizer_json_made(
    ws: Workspace, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """Older GPT-2-class checkpoints ship vocab.json and merges.txt, no tokenizer.json."""
    from genloop.data.tokenizer import load_hf_tokenizer

    source = tmp_path / "gpt2-slow"
    shutil.copytree(checkpoints["gpt2"], source)
    fast = json.loads((source / "tokenizer.json").read_text())
    vocab = dict(fast["model"]["vocab"]) | {t["content"]: t["id"] for t in fast["added_tokens"]}
    (source / "vocab.json").write_text(json.dumps(vocab))
    merges = [" ".join(pair) for pair in fast["model"]["merges"]]
    (source / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(
        json.dumps(config | {"tokenizer_class": "GPT2Tokenizer"})
    )
    (source / "tokenizer.json").unlink()

    ran = run_genloop(ws, "models", "import", source)
    assert ran.returncode == 0, ran.stderr
    assert "made tokenizer.json from vocab.json, merges.txt" in ran.stdout
    artifact = registry.artifact_path(ws, "gpt2-slow@1")
    text = "The cat sat on the mat. Hello there!"
    original = load_hf_tokenizer(checkpoints["gpt2"])
    assert load_hf_tokenizer(artifact)(text).input_ids == original(text).input_ids
    lineage = registry.resolve(ws, "gpt2-slow@1").config["import"]
    assert lineage["tokenizer_converted_from"] == ["vocab.json", "merges.txt"]
    assert lineage["files"]["tokenizer.json"] == sha256(artifact / "tokenizer.json")


def _without_config(d: Path) -> None:
    (d / "config.json").unlink()


def _bad_config(d: Path) -> None:
    (d / "config.json").write_text('{"model_type": "qwen2",', encoding="utf-8")


def _missing_shard(d: Path) -> None:
    (d / "model-00002-of-00003.safetensors").unlink()


def _truncated_shard(d: Path) -> None:
    shard = d / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])


def _tensor_not_in_shard(d: Path) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.bias"] = "model-00001-of-00003.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _without_tokenizer(d: Path) -> None:
    (d / "tokenizer.json").unlink()


def _custom_code(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MyModel"}
    (d / "config.json").write_text(json.dumps(config))
    (d / "modeling_mine.py").write_text("raise SystemExit('custom code ran')\n")


def _unknown_model_type(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "frobnicator"
    (d / "config.json").write_text(json.dumps(config))


def _other_model_type(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "gpt2"  # a causal LM transformers builds, but not these weights
    (d / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("break_it", "named", "says"),
    [
        (_without_config, "config.json", "is missing"),
        (_bad_config, "config.json", "is not valid JSON"),
        (_missing_shard, "model-00002-of-00003.safetensors", "not a file"),
        (_truncated_shard, "model-00003-of-00003.safetensors", "truncated or corrupt"),
        (_tensor_not_in_shard, "model.norm.bias", "does not hold it"),
        (_without_tokenizer, "tokenizer.json", "needs the fast tokenizer file"),
        (_custom_code, "auto_map", "never runs code"),
        (_unknown_model_type, "frobnicator", "serve.engine: vllm"),
        (_other_model_type, "GPT2LMHeadModel", "the weights do not fit"),
    ],
)
def test_a_broken_checkpoint_is_refused_by_file_and_nothing_is_registered(
    ws: Workspace,
    checkpoints: dict[str, Path],
    tmp_path: Path,
    break_it: Callable[[Path], None],
    named: str,
    says: str,
) -> None:
    source = tmp_path / "broken"
    shutil.copytree(checkpoints["qwen_sharded"], source)
    break_it(source)
    before = state(ws)
    ran = run_genloop(ws, "models", "import", source)
    assert ran.returncode == 1, ran.output
    assert "Traceback" not in ran.stderr and ran.stdout == ""
    message = ran.stderr.strip()
    assert message.startswith("error: ") and len(message.splitlines()) == 1
    assert named in message and says in message
    assert state(ws) == before  # no row, no artifact, nothing left in the store's scratch


def test_an_interrupted_copy_leaves_nothing_behind(
    ws: Workspace, checkpoints: dict[str, Path]
) -> None:
    def interrupt(copied: int) -> None:  # Ctrl-C as the first chunk lands
        raise KeyboardInterrupt

    before = state(ws)
    with pytest.raises(KeyboardInterrupt):
        import_checkpoint(ws, checkpoints["qwen_sharded"], name="cut", progress=interrupt)
    assert state(ws) == before


def test_unknown_architecture_names_what_the_native_engine_batches(
    ws: Workspace, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from genloop.serve.engine.architectures import BATCHED_MODEL_TYPES

    source = tmp_path / "odd"
    shutil.copytree(checkpoints["qwen"], source)
    _unknown_model_type(source)
    ran = run_genloop(ws, "models", "import", source)
    assert ran.returncode == 1
    assert f"batches {', '.join(BATCHED_MODEL_TYPES)}" in ran.stderr


# ------------------------------------------------------------- the imported version, everywhere


def test_serve_answers_for_the_imported_versions(
    ws: Workspace, checkpoints: dict[str, Path]
) -> None:
    from openai import OpenAI

    t5 = run_genloop(ws, "models", "import", checkpoints["t5"], "--name", "served-t5", "--json")
    t5_ref = json.loads(t5.stdout)["ref"]
    keys = make_keys(ws)
    with running_server(ws, serve_config(models=[QWEN_REF, t5_ref]), keys) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key=keys["generate"])
        served = {m.id for m in client.models.list()}
        assert {QWEN_REF, t5_ref} <= served
        for ref in (QWEN_REF, t5_ref):
            reply = client.completions.create(model=ref, prompt="The cat", max_tokens=4)
            assert reply.model == ref
            assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 4
            assert reply.choices[0].finish_reason in ("length", "stop")


def test_generate_runs_the_imported_version(ws: Workspace) -> None:
    ran = run_genloop(
        ws, "generate", QWEN_REF, "-p", "The cat", "--max-tokens", "4", "--seed", "1", "--json"
    )
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert out["model"] == "Tiny-Qwen2" and out["version"] == 1
    assert 1 <= out["choices"][0]["completion_tokens"] <= 4


def test_eval_measures_the_imported_version(ws: Workspace) -> None:
    no_data = run_genloop(ws, "eval", QWEN_REF, "--suite", "perplexity")
    assert no_data.returncode == 1 and "--dataset" in no_data.stderr  # it has no training data
    ran = run_genloop(
        ws, "eval", QWEN_REF, "-d", "notes", "--suite", "perplexity", "--device", "cpu", "--json"
    )
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert out["model"] == QWEN_REF and out["dataset"] == "notes@1"
    # untrained random weights: about as unsure as a uniform guess over the 320 tokens
    assert abs(math.log(out["metrics"]["perplexity"]) - math.log(320)) < 0.5


def test_optimize_makes_a_variant_of_the_imported_version(ws: Workspace) -> None:
    ran = run_genloop(ws, "optimize", QWEN_REF, "--quantize", "int8", "--json")
    assert ran.returncode == 0, ran.stderr
    [variant] = json.loads(ran.stdout)["variants"]
    info = registry.resolve(ws, variant["ref"])
    assert info.parent == QWEN_REF and info.tags["optimize"].startswith("int8")
    made = run_genloop(ws, "generate", info.ref, "-p", "The", "--max-tokens", "2", "--json")
    assert made.returncode == 0, made.stderr


def fine_tune_spec(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "model": {"base_model": QWEN_REF, "lora": {"r": 4, "alpha": 8}},
        "train": {
            "dataset": "notes",
            "lr": 1e-2,
            "warmup_steps": 1,
            "max_steps": 3,
            "batch_size": 4,
            "eval_every": 3,
            "eval_batches": 1,
            "checkpoint_every": 3,
            "device": "cpu",
        },
        **extra,
    }


def write_yaml(ws: Workspace, name: str, spec: dict[str, Any]) -> Path:
    path = ws.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def test_train_fine_tunes_the_imported_version_with_lora(ws: Workspace) -> None:
    ran: CliResult = run_genloop(ws, "train", write_yaml(ws, "lora", fine_tune_spec("lora")))
    assert ran.returncode == 0, ran.stderr
    assert "registered model lora@1" in ran.stdout
    info = registry.resolve(ws, "lora@1")
    assert info.parent == QWEN_REF and info.config["lora"]["r"] == 4
    tuned, base = (
        weights(registry.artifact_path(ws, "lora@1")),
        weights(registry.artifact_path(ws, QWEN_REF)),
    )
    assert tuned.keys() == base.keys()  # merged: a plain checkpoint of the same architecture
    key = "model.layers.0.self_attn.q_proj.weight"  # LoRA adapts attention projections
    assert not torch.equal(tuned[key], base[key])


def test_tune_searches_over_the_imported_version(ws: Workspace) -> None:
    tune = {
        "trials": 2,
        "workers": 1,
        "pruner": "none",
        "space": {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
    }
    path = write_yaml(ws, "search", fine_tune_spec("search", tune=tune))
    ran = run_genloop(ws, "tune", path, "--json")
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert out["counts"]["complete"] == 2
    assert registry.resolve(ws, "search@1").parent == QWEN_REF
