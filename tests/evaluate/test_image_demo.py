"""End to end through the real CLI: the demo diffusion model (examples/digits-diffusion.yaml)
draws the digit it is asked for, its evaluation beats the untrained model, and ``genloop
augment`` writes its synthetic dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits-diffusion.yaml"
PER_CLASS = 30


def genloop(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # one torch thread: these tiny models train fastest so, above all on a busy machine
    env = {**os.environ, "GENLOOP_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("GENLOOP_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "genloop", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A workspace where the demo has been trained with 'genloop train'."""
    path = tmp_path_factory.mktemp("demo") / "ws"
    assert genloop(path, "init").returncode == 0
    ran = genloop(path, "train", str(EXAMPLE), "--json")
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert out["model"] == "digits-diffusion@1" and out["steps"] == 300
    yield path


@pytest.mark.integration
def test_the_demo_model_draws_the_requested_digit(home: Path) -> None:
    from genloop.evaluate.classifier import dataset_classifier, predict
    from genloop.models.image_generation import load_image_generator
    from genloop.workspace import Workspace, registry
    from genloop.workspace.datasets import resolve_dataset

    with Workspace.open(home) as ws:
        gen = load_image_generator(registry.artifact_path(ws, "digits-diffusion"))
        dataset = resolve_dataset(ws, "digits")
        judge, meta = dataset_classifier(ws, dataset, ws.store.open_verified(dataset.artifact))
    assert meta["heldout_accuracy"] > 0.9
    wanted = [k for k in range(10) for _ in range(PER_CLASS)]
    images = gen.sample(wanted, len(wanted), seed=0)
    predicted = predict(judge, images)
    correct = predicted == torch.tensor(wanted)
    assert float(correct.float().mean()) >= 0.8
    per_class = correct.view(10, PER_CLASS).float().mean(1)
    assert float(per_class.min()) >= 0.4, per_class.tolist()  # no digit left out
    # a prompt names the digit: the same images as asking for its label
    sevens = gen.generate("7", n=4, seed=3)
    assert [im.tobytes() for im in sevens] == [
        bytes(x[0].numpy().tobytes()) for x in gen.sample([7] * 4, 4, seed=3)
    ]


@pytest.mark.integration
def test_eval_and_augment_through_the_cli(home: Path) -> None:
    ran = genloop(home, "eval", "digits-diffusion", "--set", "eval.image_samples=300", "--json")
    assert ran.returncode == 0, ran.stderr
    record = json.loads(ran.stdout)
    m = record["metrics"]
    assert record["suite"] == "image" and m["fid"] < 0.5 * m["fid_untrained"]
    assert m["conditional_accuracy"] >= 0.8
    assert record["settings"]["suites"]["image"]["extractor"]["id"].startswith(
        "classifier:digits@1:"
    )
    assert Path(record["report_dir"], "report.html").is_file()

    ran = genloop(home, "augment", "images", "digits-diffusion", "--per-class", "10", "--json")
    assert ran.returncode == 0, ran.stderr
    made = json.loads(ran.stdout)
    assert made["ref"] == "digits-diffusion-synthetic@1" and made["created"] is True
    assert made["stats"]["documents"] == 100

    ran = genloop(home, "augment", "digits-diffusion", "--per-class", "0")  # the short form
    assert ran.returncode == 1 and "between 1 and" in ran.stderr and "Traceback" not in ran.stderr
    ran = genloop(home, "eval", "digits-diffusion", "--suite", "perplexity")
    assert ran.returncode == 1 and "needs a text model" in ran.stderr
