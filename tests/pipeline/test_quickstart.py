"""``genloop quickstart --quick``: the main job end to end, then the server answers a chat.

A real subprocess, as a user runs it on a fresh machine: it prepares a reduced
python-stdlib corpus, trains, evaluates, quantizes, gates, promotes, shows three held-out
completions of the trained and the untrained model, prints an admin key and the URL, and
serves. The test then asks for a chat completion with that key and stops the server with
SIGTERM (which drains). The held-out prompts themselves are checked on small documents.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from genloop.pipeline.quickstart import held_out_prompts
from genloop.workspace import Workspace, registry

pytestmark = pytest.mark.integration

GENLOOP = [sys.executable, "-m", "genloop"]


def test_quickstart_quick_trains_deploys_and_serves_a_chat(tmp_path: Path) -> None:
    # one thread: beside the other xdist worker, two OpenMP threads wait on a descheduled peer
    env = os.environ | {"OMP_NUM_THREADS": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("GENLOOP_DATABASE_URL", None)
    ws_root = tmp_path / "ws"
    proc = subprocess.Popen(
        [*GENLOOP, "-w", str(ws_root), "quickstart", "--quick", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in proc.stdout or []], daemon=True
    ).start()
    seen: list[str] = []
    key = url = None
    ready = False
    deadline = time.monotonic() + 600
    try:
        while not (key and url and ready):
            assert proc.poll() is None, "quickstart exited early:\n" + "".join(seen)
            assert time.monotonic() < deadline, "quickstart took too long:\n" + "".join(seen)
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(line)
            if m := re.search(r"admin key \(shown once\): (gl_\S+)", line):
                key = m.group(1)
            if m := re.search(r"serving on (http://127\.0\.0\.1:\d+)", line):
                url = m.group(1)
            ready = ready or line.startswith("ready:")
        output = "".join(seen)
        # every stage ran, and training beat the untrained model on held-out text
        for stage in ("data", "train", "eval", "optimize", "register", "gate", "deploy"):
            assert re.search(rf"^\s+{stage}\s+ran\b", output, re.M), output
        m = re.search(r"held-out perplexity: ([\d.]+) trained vs ([\d.]+) untrained", output)
        assert m is not None and float(m.group(1)) < float(m.group(2)), output
        # three held-out prompts, each followed by both models' completions, which differ
        samples = _shown_samples(output)
        assert len(samples) == 3, output
        for prompt, trained, untrained in samples:
            assert prompt.lstrip().startswith("def "), output
            assert '"""' in prompt or "'''" in prompt, output
            assert trained != untrained, output

        reply = httpx.post(
            f"{url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={
                "model": "code-lm",
                "messages": [{"role": "user", "content": "def add(a, b):"}],
                "max_tokens": 8,
                "temperature": 0,
            },
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] >= 1
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key is needed
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, "".join(seen)

    ws = Workspace.open(ws_root)
    try:  # production is the quantized variant of the trained model
        production = registry.resolve(ws, "code-lm@production")
        assert production.parent == "code-lm@1"
    finally:
        ws.close()


def _shown_samples(output: str) -> list[tuple[str, str, str]]:
    """(prompt, trained, untrained) of each completion block the quickstart printed."""
    section = output.split("held-out completions", 1)[1].split("\nproduction:", 1)[0]
    blocks = re.split(r"^── \d\. .*$", section, flags=re.M)[1:]
    out = []
    for block in blocks:
        prompt, rest = block.split("  ┄ trained:\n", 1)
        trained, untrained = rest.split("  ┄ untrained:\n", 1)
        out.append((prompt.strip("\n"), trained.strip("\n"), untrained.strip("\n")))
    return out


def _docs(path: Path, *texts: str) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"m{i}.py", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    return path


METHOD = '''class Box:
    def __init__(self, items):
        """Hold the items."""
        self.items = list(items)
        self.count = len(self.items)

    @property
    def first(self):
        """The first item."""
        x = self.items[0]
        return x

    def size(self):
        """Return how many items there are."""
        n = self.count
        return n
'''

FUNCTION = '''def add(a, b):
    """Return the sum."""
    total = a + b
    return total


def long(a):
    """Spread
    over lines."""
    a += 1
    return a
'''


def test_held_out_prompts_are_method_openings_up_to_the_docstring(tmp_path: Path) -> None:
    docs = _docs(tmp_path / "test.jsonl", METHOD, FUNCTION, "def broken(:\n")
    prompts = held_out_prompts(docs, 2)
    # methods first; decorated ones and multi-line docstrings are left out; no syntax error
    assert [p.source for p in prompts] == ["m0.py:Box.__init__", "m0.py:Box.size"]
    assert prompts[1].prompt == (
        '    def size(self):\n        """Return how many items there are."""'
    )
    # too few methods: functions count too
    assert [p.source for p in held_out_prompts(docs, 3)] == [
        "m0.py:Box.__init__",
        "m0.py:Box.size",
        "m1.py:add",
    ]


def test_held_out_prompts_are_spread_over_the_candidates(tmp_path: Path) -> None:
    texts = [f"class C{i}:\n" + METHOD.split("\n", 1)[1] for i in range(9)]
    prompts = held_out_prompts(_docs(tmp_path / "test.jsonl", *texts), 3)
    # 18 candidates (two a file): the middle of each third, never all from one file
    assert [p.source for p in prompts] == [
        "m1.py:C1.size",
        "m4.py:C4.size",
        "m7.py:C7.size",
    ]
