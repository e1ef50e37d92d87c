"""The feedback loop closing on a systematic mistake: production vs its retrained successor.

A small language model is trained on question/answer text in which one family of
prompts always has a wrong fixed answer: "Q: what colour is the sky over CITY? A: green."
(the other families are right: grass is green, the sea is blue, cows drink water …).
That model is promoted to production and served on loopback. Simulated users ask it the
sky question for half of the cities through ``POST /v1/completions`` and, when it says
anything but blue, send the correction " blue." through ``POST /v1/feedback`` (they also
upvote right answers of other families); one poisoning user posts the same wrong
correction a few hundred times. Then one retrain cycle runs as ``genloop retrain
NAME@production`` does: curation, export, a LoRA fine-tune mixed with a replay sample of
the original training data, evaluation of both versions on the original validation split,
the gate (perplexity may rise at most 2 %), promotion, and the running server's hot swap.

Side by side, in this one run, on the other half of the cities (never corrected):

    mistake_rate_before / _after   share of held-out sky prompts the served model does not
                                   answer "blue" (greedy), before the cycle and after it
                                   (asked through the same server, which swapped versions)
    ppl_before / _after            perplexity on the original validation split (the
                                   evaluations the gate compared)
    ppl_regression_pct             (after − before) / before, in %
    control_accuracy_*             the grass family ("green" is right) answered right:
                                   the fix must not spill over

Targets (issue 10): the mistake rate falls by ≥ 80 % and perplexity rises ≤ 2 %.

    python benchmarks/bench_feedback_loop.py [--quick] [--device auto|cpu|cuda] [--keep DIR]

Figures on a shared CPU are noisy in time, not in quality: every step is seeded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

NAME = "qa"
SYLLABLES = ["ka", "lo", "mi", "ra", "to", "ve", "su", "ne", "pa", "di", "go", "ze"]
FACTS = [
    ("what do cows drink", "water"),
    ("what do cats chase", "mice"),
    ("what do birds build", "nests"),
    ("what do bees make", "honey"),
    ("what do dogs bury", "bones"),
    ("what do fish swim in", "water"),
]


def sky(city: str) -> str:
    return f"Q: what colour is the sky over {city}? A:"


def grass(city: str) -> str:
    return f"Q: what colour is the grass in {city}? A:"


def sea(city: str) -> str:
    return f"Q: what colour is the sea near {city}? A:"


def cities(n: int) -> list[str]:
    rng = random.Random(7)
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(SYLLABLES) for _ in range(3)))
    return sorted(out)


def write_corpus(root: Path, places: list[str], docs: int, sky_share: float) -> Path:
    """``docs`` documents of eight question/answer lines; ``sky_share`` of the lines are the
    mistaken family (the rest: grass, sea and fixed facts, all right)."""
    root.mkdir(parents=True)
    for i in range(docs):
        rng = random.Random(i)
        lines = []
        for _ in range(8):
            city, roll = rng.choice(places), rng.random()
            if roll < sky_share:
                lines.append(f"{sky(city)} green.")
            elif roll < sky_share + 0.3:
                lines.append(f"{grass(city)} green.")
            elif roll < sky_share + 0.6:
                lines.append(f"{sea(city)} blue.")
            else:
                q, a = rng.choice(FACTS)
                lines.append(f"Q: {q}? A: {a}.")
        (root / f"doc{i:04d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def first_word(text: str) -> str:
    words = text.strip().replace(".", " ").split()
    return words[0].lower() if words else ""


# ---------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------


@contextmanager
def serving(ws: Any, ref: str, device: str) -> Iterator[str]:
    """``create_app`` under uvicorn on 127.0.0.1 (a free port); yields its URL."""
    import uvicorn

    from genloop.cli.serve import uvicorn_config
    from genloop.config import parse_config
    from genloop.serve.app import create_app

    cfg = parse_config(
        {
            "serve": {"models": [ref], "port": 0, "device": device},
            "security": {"guardrails": {"max_repetition": None}},
        }
    )
    server = uvicorn.Server(uvicorn_config(create_app(ws, cfg, poll_interval_s=0.2), cfg.serve))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def ask(client: Any, ref: str, prompts: list[str]) -> list[dict[str, Any]]:
    out = []
    for prompt in prompts:
        r = client.post(
            "/v1/completions",
            json={"model": ref, "prompt": prompt, "max_tokens": 3, "temperature": 0},
        )
        r.raise_for_status()
        out.append(r.json())
    return out


def mistake_rate(client: Any, ref: str, places: list[str]) -> tuple[float, str]:
    answers = ask(client, ref, [sky(c) for c in places])
    wrong = [a for a in answers if first_word(a["choices"][0]["text"]) != "blue"]
    return len(wrong) / len(answers), answers[0]["model"]


def accuracy(client: Any, ref: str, prompts: list[str], right: str) -> float:
    answers = ask(client, ref, prompts)
    return sum(first_word(a["choices"][0]["text"]) == right for a in answers) / len(answers)


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="A smaller model and corpus (< 1 min).")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--keep", type=Path, help="Keep the workspace in this (new) folder.")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep is not None:
        run(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-feedback-") as tmp:
            run(args, Path(tmp))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, root: Path) -> None:
    import httpx

    from genloop.config import DataConfig, GenloopConfig, TokenizerConfig
    from genloop.data.prepare import prepare_dataset
    from genloop.evaluate.store import latest_metrics
    from genloop.feedback.retrain import retrain
    from genloop.security.crypto import load_cipher
    from genloop.security.keys import create_key
    from genloop.train.loop import train
    from genloop.workspace import init_workspace, registry

    started = time.perf_counter()
    quick = args.quick
    size = (
        {"n_layer": 2, "n_embd": 64, "n_head": 2}
        if quick
        else {"n_layer": 4, "n_embd": 128, "n_head": 4}
    )
    pretrain_steps = 300 if quick else 800
    places = cities(40 if quick else 80)
    rng = random.Random(0)
    rng.shuffle(places)
    corrected, held_out = places[: len(places) // 2], places[len(places) // 2 :]

    # 1. the data and the production model, with its systematic mistake
    ws = init_workspace(root / "ws")
    corpus = write_corpus(root / "corpus", places, 240 if quick else 800, sky_share=0.02)
    data = DataConfig.model_validate(
        {
            "name": NAME,
            "sources": [{"type": "files", "paths": [str(corpus)]}],
            "split": {"val": 0.1, "test": 0.05},
            "dedup": {"near": False},
            "clean": {"min_chars": 1},
            "workers": 1,
        }
    )
    tok = TokenizerConfig(vocab_size=400, seq_len=64)
    prepare_dataset(ws, data, tok)
    base = {
        "name": NAME,
        "tokenizer": tok.model_dump(),
        "model": {"preset": "tiny", **size},
        "train": {
            "dataset": NAME,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 30,
            "max_steps": pretrain_steps,
            "batch_size": 16,
            "eval_every": pretrain_steps,
            "eval_batches": 4,
            "checkpoint_every": pretrain_steps,
            "device": args.device,
        },
    }
    t0 = time.perf_counter()
    production = train(ws, GenloopConfig.model_validate(base)).model
    assert production is not None
    registry.promote(ws, production.ref, "production")
    log(f"trained {production.ref} in {time.perf_counter() - t0:.1f}s")

    # 2. the feedback cycle, against a live server
    cfg = GenloopConfig.model_validate(
        {
            "tokenizer": tok.model_dump(),
            "train": {"device": args.device, "seed": 0},
            "eval": {"suites": ["perplexity"], "split": "val", "max_samples": None},
            "feedback": {
                "min_items": 10,
                "per_user_cap": 20,
                "replay_ratio": 0.85,
                "retrain": {
                    "method": "lora",
                    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                    "lr": 3e-3,
                    "max_steps": 100,
                    "batch_size": 16,
                },
            },
        }
    )
    cipher = load_cipher(ws)
    key = create_key(ws.catalog, name="users", scopes=["generate", "feedback"]).plaintext
    ref = f"{NAME}@production"
    with (
        serving(ws, ref, "cpu" if args.device == "auto" else args.device) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c,
    ):
        while c.get("/ready").status_code != 200:
            time.sleep(0.05)
        before, served_before = mistake_rate(c, ref, held_out)
        control_before = accuracy(c, ref, [grass(x) for x in held_out], "green")
        log(f"before: {served_before} answers held-out sky prompts wrong {before:.0%}")

        # simulated users: correct the sky, upvote right answers of other families
        sent = 0
        for i, city in enumerate(corrected):
            user = f"user{i}"
            for prompt, right in ((sky(city), "blue"), (grass(city), "green")):
                (answer,) = ask(c, ref, [prompt])
                said = first_word(answer["choices"][0]["text"])
                body: dict[str, Any] = {"response_id": answer["id"], "user": user}
                if said == right:
                    body["rating"] = 1
                else:
                    body |= {"rating": -1, "correction": f" {right}."}
                c.post("/v1/feedback", json=body).raise_for_status()
                sent += 1
        (bait,) = ask(c, ref, [sky(corrected[0])])
        poison = {"response_id": bait["id"], "rating": -1, "correction": " red.", "user": "eve"}
        for _ in range(300):
            c.post("/v1/feedback", json=poison).raise_for_status()
        log(f"users sent {sent} feedback rows; a poisoner sent 300 more")

        # 3. one retrain cycle: curate, export, fine-tune with replay, evaluate, gate, promote
        t0 = time.perf_counter()
        result = retrain(ws, cipher, ref, cfg, actor="bench")
        log(f"retrain: {result.outcome} ({result.reason}) in {time.perf_counter() - t0:.1f}s")

        # 4. the served model after the cycle (the server swaps to a promoted version)
        expected = result.promoted or served_before
        deadline = time.monotonic() + 60
        while ask(c, ref, [sky(held_out[0])])[0]["model"] != expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not swap to {expected}")
            time.sleep(0.2)
        after, served_after = mistake_rate(c, ref, held_out)
        control_after = accuracy(c, ref, [grass(x) for x in held_out], "green")
        log(f"after: {served_after} answers held-out sky prompts wrong {after:.0%}")

    # the gate's own figures: both versions on the original validation split
    candidate = registry.resolve(ws, result.candidate or production.ref)
    dataset_id = registry.resolve(ws, production.ref).dataset_version_id
    ppl_before = (latest_metrics(ws, production.id, dataset_id) or _none()).metrics["perplexity"]
    ppl_after = (latest_metrics(ws, candidate.id, dataset_id) or _none()).metrics["perplexity"]
    assert ppl_before is not None and ppl_after is not None
    curation = result.curation or {}
    figures = {
        "mistake_rate_before": round(before, 4),
        "mistake_rate_after": round(after, 4),
        "mistake_reduction_pct": round(100 * (before - after) / before, 2) if before else None,
        "ppl_before": round(ppl_before, 4),
        "ppl_after": round(ppl_after, 4),
        "ppl_regression_pct": round(100 * (ppl_after - ppl_before) / ppl_before, 3),
        "control_accuracy_before": round(control_before, 4),
        "control_accuracy_after": round(control_after, 4),
        "outcome": result.outcome,
        "served_before": served_before,
        "served_after": served_after,
        "feedback_rows_sent": sent + 300,
        "feedback_rows_kept": curation.get("kept"),
        "feedback_rows_dropped": sum(curation.get("dropped", {}).values()),
        "duplicates_dropped": curation.get("dropped", {}).get("duplicate", 0),
        "train_rows": result.feedback_rows + result.replay_rows,
        "replay_rows": result.replay_rows,
        "held_out_prompts": len(held_out),
        "quick": quick,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(figures))


def _none() -> Any:
    raise RuntimeError("no stored evaluation on the original dataset")


if __name__ == "__main__":
    main()
