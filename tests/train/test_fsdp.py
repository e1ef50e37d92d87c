"""FSDP2 that shards at init, checkpoints sharded and resumes at another world size.

One module-scoped scenario (torchrun, 2 gloo CPU ranks; each start imports torch twice):

- ``ref``: one process, batch 2B, 6 steps, uninterrupted (in this process);
- phase A: 2 × FSDP2, batch B per rank; rank 1 SIGKILLs itself after the step-3
  checkpoint, which is sharded (one safetensors file per rank);
- the workspace is copied and the run resumed from step 3 in each copy: by one process
  (batch 2B) and by 2 × FSDP2 again. Both must go on exactly as ``ref`` did. Other
  copies: resumed with a wider model (refused, naming the tensor and both shapes), and
  with a damaged shard (refused by the manifest).

Separately: a model built sharded on the meta device starts from the very weights one
process builds with the same seed, and reads back as a base model slice by slice.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genloop.config import GenloopConfig
from genloop.errors import GenloopError

from .test_distributed import (
    CONFIG,
    RANK1_GUARD,
    TORCHRUN,
    TRAIN,
    B,
    output,
    prepare_tiny,
    runs_named,
    series,
    torchrun,
    write_config,
)

STEPS = TRAIN["max_steps"]
RTOL = 1e-5  # fp32, dropout off: only the summation order differs between shardings

pytestmark = pytest.mark.skipif(
    not TORCHRUN.exists() or not torch.distributed.is_gloo_available(),
    reason="needs torchrun and the gloo backend",
)


@dataclass
class Scenario:
    root: Path
    ref_run: str
    ref_history: list[float]
    run_id: str  # phase A's run, resumed in each copy
    phase_a: subprocess.CompletedProcess[str]
    one_process: list[float]  # the losses of the run one process resumed (steps 1..6)
    two_ranks: subprocess.CompletedProcess[str]


def ref_config(**train: object) -> GenloopConfig:
    return GenloopConfig.model_validate(
        {**CONFIG, "train": {**TRAIN, "batch_size": 2 * B, **train}}
    )


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    from genloop.train.loop import train
    from genloop.workspace import Workspace

    root = tmp_path_factory.mktemp("fsdp")
    home = root / "ws"
    prepare_tiny(home)
    with Workspace.open(home) as ws:
        ref = train(ws, ref_config(), model_name="ref")

    cfg = write_config(root / "fsdp.yaml", strategy="fsdp")
    guard = root / "rank1_guard.py"
    # rank 1 dies right after the step-3 checkpoint; it writes its shard file into rank 0's
    # staging folder, but never an artifact or a catalog row of its own
    guard.write_text(RANK1_GUARD)
    phase_a = torchrun(home, str(guard), "train", str(cfg), "--name", "f")
    [run] = runs_named(home, "f")
    shutil.copytree(home, root / "one")
    shutil.copytree(home, root / "two")
    shutil.copytree(home, root / "bigger")
    shutil.copytree(home, root / "tampered")

    with Workspace.open(root / "one") as ws:  # the same global batch in one process
        one = train(ws, ref_config(), model_name="f", resume=run.id)
    two = torchrun(root / "two", "-m", "genloop", "train", str(cfg), "--name", "f", "--resume")
    return Scenario(root, ref.run_id, ref.history, run.id, phase_a, one.history, two)


def test_the_sharded_checkpoint_is_one_safetensors_file_per_rank(scenario: Scenario) -> None:
    from genloop.train import checkpoint as ckpt
    from genloop.workspace import Workspace

    assert scenario.phase_a.returncode != 0, output(scenario.phase_a)  # rank 1 was killed
    with Workspace.open(scenario.root / "ws") as ws:
        found = ckpt.load_latest(ws.store, scenario.run_id)  # verifies the manifest
        assert found is not None and found.step == 3
        files = sorted(p.relative_to(found.path).as_posix() for p in found.path.rglob("*"))
    shards = [f for f in files if f.startswith("shards/") and f.endswith(".safetensors")]
    assert len(shards) == 2, files
    assert found.state["format"] == "sharded" and found.state["world_size"] == 2
    # safetensors and JSON only: nothing a loader would unpickle
    assert not [f for f in files if f.endswith((".metadata", ".pt", ".bin", ".pkl", ".distcp"))]
    # each rank wrote half the embedding rows (the first dimension is what FSDP2 shards)
    rows = sorted(
        load_file(str(found.path / s))["model.embed_tokens.weight"].shape[0] for s in shards
    )
    assert rows == [150, 150]


def test_one_process_resumes_a_two_rank_run_exactly(scenario: Scenario) -> None:
    ref = scenario.ref_history
    assert len(ref) == STEPS and ref[-1] < ref[0] - 0.2  # it learns, so agreement means something
    got = scenario.one_process
    assert len(got) == STEPS  # the first 3 from the checkpoint's history, then 3 trained
    for step, (a, b) in enumerate(zip(got, ref, strict=True), start=1):
        assert a == pytest.approx(b, rel=RTOL), f"step {step}: {a} vs {b}"


def test_two_ranks_resume_a_two_rank_run_exactly(scenario: Scenario) -> None:
    two = scenario.two_ranks
    assert two.returncode == 0, output(two)
    losses = series(scenario.root / "two", scenario.run_id, "loss")
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    for (step, got), want in zip(losses, scenario.ref_history, strict=True):
        assert got == pytest.approx(want, rel=RTOL), f"step {step}: {got} vs {want}"


def test_the_export_is_the_trained_model_in_hugging_face_layout(scenario: Scenario) -> None:
    from genloop.models.family import get_family
    from genloop.workspace import Workspace, registry

    assert scenario.two_ranks.returncode == 0, output(scenario.two_ranks)
    family = get_family("causal_lm")
    with Workspace.open(scenario.root / "two") as ws:
        exported = ws.store.open_verified(registry.resolve(ws, "f").artifact)
        model = family.load(exported)
        reference = family.load(ws.store.open_verified(registry.resolve(ws, "ref").artifact))
        names = sorted(p.name for p in exported.iterdir())
    assert {"config.json", "model.safetensors", "genloop.json", "tokenizer.json"} <= set(names)
    assert type(model).__name__ == "LlamaForCausalLM"
    # written as save_pretrained writes it: the tied lm_head is the embedding, stored once
    assert "lm_head.weight" not in load_file(str(exported / "model.safetensors"))
    ids = torch.arange(16).reshape(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-5
        )


def test_a_checkpoint_of_another_size_is_refused_naming_the_tensor(scenario: Scenario) -> None:
    from genloop.train.loop import train
    from genloop.workspace import Workspace

    cfg = ref_config().model_copy(deep=True)
    cfg.model.n_embd = 48
    with Workspace.open(scenario.root / "bigger") as ws, pytest.raises(GenloopError) as err:
        train(ws, cfg, model_name="f", resume=scenario.run_id)
    message = str(err.value)
    assert "does not fit this model" in message, message
    assert "model.embed_tokens.weight: checkpoint [300, 32], model [300, 48]" in message, message


def test_a_damaged_shard_is_refused_by_the_manifest(scenario: Scenario) -> None:
    from genloop.train import checkpoint as ckpt
    from genloop.train.loop import train
    from genloop.workspace import Workspace

    with Workspace.open(scenario.root / "tampered") as ws:
        [(step, key)] = ckpt.list_checkpoints(ws.store, scenario.run_id)
        assert step == 3
        shard = sorted((ws.store.path(key) / "shards").iterdir())[-1]
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF  # one bit of rank 1's last tensor
        shard.write_bytes(bytes(data))
        assert ckpt.load_latest(ws.store, scenario.run_id) is None
        with pytest.raises(GenloopError, match="none of them verifies"):
            train(ws, ref_config(), model_name="f", resume=scenario.run_id)


# the weights a model starts from: 2 FSDP2 ranks (built on meta, each initialising its
# shard) write them with export_sharded; one process builds them whole
BUILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    from genloop.train import distributed
    from genloop.train.text import build_on_meta, load_sharded

    dist = distributed.setup("cpu")
    torch.manual_seed(7)
    model = build_on_meta(CONFIG, dist.device, distributed.shard)
    assert distributed.is_sharded(model)
    # no rank holds more than its part of the embedding (301 rows: 151 and 150)
    local = model.model.embed_tokens.weight.to_local().shape[0]
    assert local == 151 - dist.rank, local
    out = Path(sys.argv[1])
    distributed.export_sharded(
        model, out if dist.is_main else None, family="causal_lm", tokenizer_dir=None
    )
    draw = torch.rand(4)  # the generator is where one process leaves it, too
    distributed.barrier(dist)
    # read back as a base model: each rank reads its slices of model.safetensors
    base = load_sharded(out, dist.device, distributed.shard)
    assert base is not None and distributed.is_sharded(base)
    assert base.model.embed_tokens.weight.to_local().shape[0] == 151 - dist.rank
    again = out.with_name("again")
    distributed.export_sharded(
        base, again if dist.is_main else None, family="causal_lm", tokenizer_dir=None
    )
    if dist.is_main:
        from safetensors.torch import save_file

        save_file({"draw": draw}, str(out / "draw.safetensors"))
    distributed.teardown(dist)
    """
)
MODEL = {"preset": "tiny", "vocab_size": 301, "n_layer": 2, "n_embd": 32, "n_head": 2}


def test_a_model_built_sharded_starts_from_the_weights_one_process_builds_and_reloads(
    tmp_path: Path,
) -> None:
    from genloop.models.family import get_family
    from genloop.train.text import build_on_meta

    script = tmp_path / "build.py"
    script.write_text(f"CONFIG = {MODEL!r}\n{BUILD}")
    proc = torchrun(tmp_path / "ws", str(script), str(tmp_path / "out"), timeout=180)
    assert proc.returncode == 0, output(proc)
    torch.manual_seed(7)
    whole = build_on_meta(MODEL, torch.device("cpu"))
    draw = torch.rand(4)
    sharded = get_family("causal_lm").load(tmp_path / "out")
    got, want = sharded.state_dict(), whole.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k  # equal, not close
    assert torch.equal(load_file(str(tmp_path / "out" / "draw.safetensors"))["draw"], draw)
    # a base model read back shard by shard holds exactly the weights written
    reread = load_file(str(tmp_path / "again" / "model.safetensors"))
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert reread.keys() == written.keys() and "lm_head.weight" not in written  # tied
    for k in written:
        assert torch.equal(reread[k], written[k]), k
    # and they are transformers' own initialisation: normal(0, 0.02) matrices, unit norms
    std = float(want["model.layers.0.mlp.up_proj.weight"].std())
    assert 0.018 < std < 0.022, std
    assert torch.equal(want["model.norm.weight"], torch.ones(32))
