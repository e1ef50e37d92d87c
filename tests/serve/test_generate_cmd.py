"""``genloop generate`` as a user runs it: a prompt (streamed, or --json), a JSONL batch killed
with SIGKILL and resumed, images from an image model, and clear errors.

Most runs call the console entry point in this process; the killed batch is a real
subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from genloop.workspace import Workspace, init_workspace, registry

from ..conftest import CliResult, run_genloop

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def ws(
    tmp_path_factory: pytest.TempPathFactory, model_dirs: tuple[Path, Path]
) -> Iterator[Workspace]:
    """tiny@1 (a causal LM) and pix@1 (a two-class GAN, 8×8)."""
    from genloop.models.gan import FAMILY as GAN

    root = tmp_path_factory.mktemp("generate_cmd")
    workspace = init_workspace(root / "ws")
    registry.register_model(workspace, "tiny", "causal_lm", model_dirs[0])
    torch.manual_seed(0)
    gan = GAN.build(
        {
            "image_size": 8,
            "channels": 1,
            "latent_dim": 8,
            "base_channels": 8,
            "num_classes": 2,
            "class_names": ["cat", "dog"],
        }
    )
    registry.register_model(workspace, "pix", "gan", GAN.save(gan, root / "gan"))
    yield workspace
    workspace.close()


def succeeded(ran: CliResult) -> Any:
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout)  # --json: nothing but the JSON on stdout


def error_line(ran: CliResult) -> str:
    assert ran.returncode != 0 and "Traceback" not in ran.stderr, ran.stderr
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, ran.stderr
    return errors[0]


def hf_greedy_text(path: Path, prompt: str, max_new_tokens: int) -> str:
    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.models.pretrained import load_pretrained

    model, tok = load_pretrained(path), load_hf_tokenizer(path)
    ids = tok(prompt)["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    text: str = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    return text


def test_a_prompt_greedy_json_and_streamed(ws: Workspace, model_dirs: tuple[Path, Path]) -> None:
    args = ("generate", "tiny@1", "-p", "The cat sat", "--temperature", "0", "--max-tokens", "12")
    data = succeeded(run_genloop(ws, *args, "--json"))
    assert data["model"] == "tiny" and data["version"] == 1 and data["prompt_tokens"] > 0
    (choice,) = data["choices"]
    assert choice["completion_tokens"] == 12 and choice["finish_reason"] == "length"
    assert choice["text"] == hf_greedy_text(model_dirs[0], "The cat sat", 12)
    streamed = run_genloop(ws, *args)
    assert streamed.returncode == 0 and streamed.stdout == choice["text"] + "\n"


def test_n_seeded_completions_and_a_model_directory(
    ws: Workspace, model_dirs: tuple[Path, Path]
) -> None:
    args = ("-p", "Rain", "-n", "3", "--seed", "5", "--max-tokens", "8", "--json")
    by_ref = succeeded(run_genloop(ws, "generate", "tiny", *args))
    by_dir = succeeded(run_genloop(ws, "generate", model_dirs[0], *args))
    assert [c["text"] for c in by_ref["choices"]] == [c["text"] for c in by_dir["choices"]]
    assert len({c["text"] for c in by_ref["choices"]}) > 1
    chat = succeeded(run_genloop(ws, "generate", "tiny", "-p", "Hi", "--chat", "--json"))
    assert chat["prompt_tokens"] > 3  # the template wrapped the one-word message


def write_prompts(path: Path, count: int) -> Path:
    lines = [json.dumps({"id": f"q{i}", "prompt": f"The dog {i} ran"}) for i in range(count)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def rows(path: Path) -> dict[str, dict[str, Any]]:
    found = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")[:-1]]
    by_id = {r["id"]: r for r in found}
    assert len(by_id) == len(found), "an id was written twice"
    return by_id


def test_a_batch_killed_with_sigkill_resumes_where_it_stopped(
    ws: Workspace, tmp_path: Path
) -> None:
    count = 40
    prompts = write_prompts(tmp_path / "prompts.jsonl", count)
    settings = ("--max-tokens", "24", "--seed", "11", "--batch-size", "2")
    full = tmp_path / "full.jsonl"
    done = succeeded(
        run_genloop(ws, "generate", "tiny", "-i", prompts, "-o", full, *settings, "--json")
    )
    assert done["generated"] == count and done["skipped"] == 0

    killed = tmp_path / "killed.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "GENLOOP_DATABASE_URL"}
    env |= {"GENLOOP_HOME": str(ws.root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "genloop", "generate", "tiny", "-i", prompts, "-o", killed]
    proc = subprocess.Popen(
        [*command, *settings, "--json"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if killed.is_file() and killed.read_bytes().count(b"\n") >= 5:
                break
            time.sleep(0.005)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    before = killed.read_bytes().count(b"\n")
    assert 5 <= before < count
    with killed.open("ab") as f:
        f.write(b'{"id": "q0", "te')  # as if the kill had torn a line
    resumed = succeeded(
        run_genloop(ws, "generate", "tiny", "-i", prompts, "-o", killed, *settings, "--json")
    )
    assert resumed["skipped"] == before and resumed["generated"] == count - before
    assert rows(killed) == rows(full)  # every id once, the same seeded texts


def test_images_from_an_image_model(ws: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "pics"
    data = succeeded(
        run_genloop(
            ws, "generate", "pix", "-p", "dog", "-n", "4", "--seed", "1", "--out", out, "--json"
        )
    )
    names = sorted(Path(p).name for p in data["images"])
    assert names == ["000.png", "001.png", "002.png", "003.png", "grid.png"]
    assert all((out / name).is_file() for name in names)
    again = tmp_path / "again"
    succeeded(
        run_genloop(
            ws, "generate", "pix", "-p", "dog", "-n", "4", "--seed", "1", "--out", again, "--json"
        )
    )
    assert (out / "001.png").read_bytes() == (again / "001.png").read_bytes()  # seeded


def test_clear_errors(ws: Workspace, tmp_path: Path) -> None:
    cases = [
        (("generate", "tiny"), "--prompt"),
        (("generate", "tiny", "-i", tmp_path / "in.jsonl"), "--input and --output go together"),
        (("generate", "nosuch", "-p", "x"), "no model named 'nosuch'"),
        (("generate", "tiny@9", "-p", "x"), "no version 9"),
        (("generate", "tiny", "-p", "x", "--device", "tpu"), "--device"),
        (("generate", "tiny", "-p", "x", "--out", tmp_path), "--out is for image models"),
        (("generate", "pix", "-p", "x"), "x"),  # not a class: the images module names them
        (("generate", "pix", "-p", "dog", "--guidance-scale", "3"), "only text-to-image"),
        (("generate", "tiny", "-p", "x", "--steps", "5"), "for text-to-image models"),
        (
            ("generate", "tiny", "-i", tmp_path / "missing.jsonl", "-o", tmp_path / "o.jsonl"),
            "does not exist",
        ),
    ]
    for args, words in cases:
        assert words in error_line(run_genloop(ws, *args)), args
