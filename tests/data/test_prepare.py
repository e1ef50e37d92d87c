"""``prepare_dataset`` end to end, on small corpora the tests write: what goes in, what the
version holds (documents, token shards, images, stats, card, quarantine), what never
reaches it (PII, duplicates, broken input), and when a new version is made."""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from genloop.config import DataConfig, TokenizerConfig
from genloop.data import prepare as prepare_module
from genloop.data.images import load_image_dataset
from genloop.data.pack import TokenDataset
from genloop.data.prepare import prepare_dataset
from genloop.data.tokenizer import EOS, load_tokenizer
from genloop.errors import GenloopError
from genloop.workspace import Workspace, init_workspace
from genloop.workspace.datasets import DatasetVersionInfo, list_dataset_versions, resolve_dataset

TOKENIZER = TokenizerConfig(vocab_size=400)
Mixed = tuple[Path, Workspace, DatasetVersionInfo]  # corpus, workspace, version 1
VOCABULARY = (
    "the a model learns patterns from data every day and night across small towns while "
    "rivers carry quiet stones under bright green bridges near old markets where people "
    "trade bread fish apples stories songs tools maps letters and new ideas"
)
WORDS = VOCABULARY.split()


def prose(seed: int, n: int = 60) -> str:
    """A distinct document of ``n`` words (no two seeds are near duplicates)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n)) + f" (document {seed})."


def write_mixed(root: Path) -> Path:
    """txt + md + jsonl (2 malformed lines, 1 without 'text') + csv: 26 good records, one of
    them too short, one NFC-normalized on the way."""
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    for i in range(5):
        (corpus / f"a{i}.txt").write_text(prose(i), encoding="utf-8")
    (corpus / "short.txt").write_text("tiny", encoding="utf-8")
    for i in range(5, 8):
        (corpus / f"b{i}.md").write_text(f"# Note {i}\n\n{prose(i)}\n", encoding="utf-8")
    lines = [json.dumps({"text": prose(i)}) for i in range(8, 19)]
    lines.insert(3, "{not json")
    lines.insert(7, '{"text": "unterminated')
    lines.append(json.dumps({"body": "no text field here"}))
    lines.append(json.dumps({"text": "Cafe\u0301 " + prose(19)}))  # NFD: 'e' + combining accent
    (corpus / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with (corpus / "d.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        for i in range(20, 26):
            writer.writerow([i, prose(i)])
    return corpus


def data_config(name: str, sources: list[dict[str, Any]], **extra: Any) -> DataConfig:
    spec: dict[str, Any] = {"name": name, "sources": sources, "split": {"val": 0.2, "test": 0.2}}
    return DataConfig.model_validate(spec | extra)


def files_config(path: Path, name: str = "mixed", **extra: Any) -> DataConfig:
    return data_config(name, [{"type": "files", "paths": [str(path)]}], **extra)


def artifact(ws: Workspace, info: DatasetVersionInfo) -> Path:
    return ws.store.open_verified(info.artifact)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def decoded_documents(directory: Path, split: str) -> Iterator[str]:
    """The documents of a split's token shards, decoded with the dataset's own tokenizer."""
    tokenizer = load_tokenizer(directory / "tokenizer")
    eos = tokenizer.token_to_id(EOS)
    shards = TokenDataset(directory / "tokens", split, seq_len=16)
    for d in range(shards.num_docs):
        ids = shards.document(d)
        assert int(ids[-1]) == eos  # every document ends with the end-of-document id
        yield tokenizer.decode(ids[:-1].tolist(), skip_special_tokens=False)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mixed]:
    """The mixed corpus prepared once with two worker processes (the pool path)."""
    root = tmp_path_factory.mktemp("mixed")
    corpus = write_mixed(root)
    ws = init_workspace(root / "ws")
    info, created = prepare_dataset(ws, files_config(corpus), TOKENIZER, workers=2)
    assert created
    yield corpus, ws, info
    ws.close()


# ----------------------------------------------------------------------- the version


def test_mixed_corpus_becomes_version_1_with_consistent_stats(mixed: Mixed) -> None:
    _, ws, info = mixed
    assert (info.name, info.version, info.kind, info.status) == ("mixed", 1, "text", "ready")
    assert resolve_dataset(ws, "mixed").id == info.id
    s = info.stats
    assert s["records_read"] == 27  # 5 txt + 1 short + 3 md + 12 jsonl + 6 csv
    assert s["quarantined_at_source"] == {"bad_json": 2, "missing_field": 1}

    # Each step sees what the one before kept; kept = seen - dropped.
    steps = {st["name"]: st for st in s["steps"]}
    assert list(steps) == ["normalize", "quality", "pii"]
    seen = s["records_read"]
    for st in s["steps"]:
        assert st["seen"] == seen
        assert st["kept"] == st["seen"] - sum(st["dropped"].values())
        seen = st["kept"]
    assert steps["quality"]["dropped"] == {"too_short": 1}
    assert steps["normalize"]["changed"] >= 2  # the NFD record and the md files' last newline
    assert s["drops"] == {"bad_json": 2, "missing_field": 1, "too_short": 1}
    assert s["dedup"] == {"exact": 0, "near": 0}

    # Splits add up, to the documents, bytes and tokens of the whole.
    splits = s["splits"]
    assert set(splits) == {"train", "val", "test"}
    assert s["documents"] == seen == 26
    for key in ("documents", "bytes", "tokens"):
        assert sum(v[key] for v in splits.values()) == s[key]
    assert s["tokenizer"]["kind"] == "bpe" and s["tokenizer"]["vocab_size"] <= 400


def test_version_files_agree_with_stats(mixed: Mixed) -> None:
    _, ws, info = mixed
    path = artifact(ws, info)  # every file matches the manifest
    assert json.loads((path / "stats.json").read_text()) == info.stats
    assert json.loads((path / "config.json").read_text())["data"]["name"] == "mixed"
    texts: dict[str, str] = {}
    for split, v in info.stats["splits"].items():
        docs = read_jsonl(path / "docs" / f"{split}.jsonl")
        assert len(docs) == v["documents"]
        assert sum(len(d["text"].encode()) for d in docs) == v["bytes"]
        texts |= {d["id"]: d["text"] for d in docs}
    assert texts["c.jsonl:15"].startswith("Caf\u00e9 ")  # normalized to NFC
    assert texts["d.csv:2"] == prose(20)  # ids name the file and the line
    assert "short.txt" not in texts

    quarantine = read_jsonl(path / "quarantine.jsonl")
    assert [(q["id"], q["reason"]) for q in quarantine] == [
        ("c.jsonl:4", "bad_json"),
        ("c.jsonl:8", "bad_json"),
        ("c.jsonl:14", "missing_field"),
    ]
    assert all(q["stage"] == "source" and q["detail"] for q in quarantine)

    samples = read_jsonl(path / "samples.jsonl")
    assert 0 < len(samples) <= 20
    assert all(texts[x["id"]] == x["text"] for x in samples)

    card = (path / "card.md").read_text()
    assert card.startswith("# Dataset card: mixed")
    for word in ("bad_json", "missing_field", "too_short", "quarantine.jsonl", info.content_hash):
        assert word in card


def test_token_shards_decode_to_the_cleaned_documents(mixed: Mixed) -> None:
    _, ws, info = mixed
    path = artifact(ws, info)
    for split, v in info.stats["splits"].items():
        docs = [d["text"] for d in read_jsonl(path / "docs" / f"{split}.jsonl")]
        shards = TokenDataset(path / "tokens", split, seq_len=16)
        assert (shards.num_docs, shards.num_tokens) == (len(docs), v["tokens"])
        assert list(decoded_documents(path, split)) == docs
    x, y = TokenDataset(path / "tokens", "train", seq_len=16)[0]
    assert x.shape == y.shape == (16,) and np.array_equal(x[1:], y[:-1])


def test_workers_do_not_change_the_output(mixed: Mixed, tmp_path: Path) -> None:
    corpus, ws, info = mixed
    with init_workspace(tmp_path / "ws") as other:
        one, _ = prepare_dataset(other, files_config(corpus), TOKENIZER, workers=1)
        assert one.content_hash == info.content_hash
        a, b = artifact(ws, info), artifact(other, one)
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
        for rel in files:
            if rel.name in ("stats.json", "MANIFEST.sha256"):  # the run's seconds differ
                continue
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
        assert {**one.stats, "seconds": 0} == {**info.stats, "seconds": 0}


# ----------------------------------------------------------------------- what never gets in

PII = {
    "email": ["alice.smith@example.com", "bob+tag@mail.example.org"],
    "phone": ["+1 415 555 0132", "(415) 555-0199", "+44 20 7946 0958"],
    "ipv4": ["93.184.216.34", "203.0.113.42"],
    "ipv6": ["2001:4860:4860::8888", "2a00:1450:4001:81c::200e"],
    "card": ["4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005"],
    "aws": ["AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"],
    "github": ["ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"],
    "openai": ["sk-proj-4f9XbT2mQ8wL1zR7vK3nY6pD"],
    "jwt": [
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
        "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
    ],
    "password": ["Hunter2Secret!", "s3cr3t-Pa55word"],
}
PLANTED = [value for values in PII.values() for value in values]
PLANTED += [v.replace(" ", "").replace("-", "") for v in PII["card"]]  # digits only


def pii_sentences(seed: int) -> str:
    e, p, c = PII["email"], PII["phone"], PII["card"]
    return (
        f"{prose(seed, 20)} Write to {e[seed % 2]} or call {p[seed % 3]}. "
        f"The server at {PII['ipv4'][seed % 2]} and {PII['ipv6'][seed % 2]} took card "
        f"{c[seed % 3]}. AWS key {PII['aws'][0]} with aws_secret_access_key = {PII['aws'][1]}, "
        f"GitHub {PII['github'][0]}, OpenAI sk key {PII['openai'][0]}, "
        f"session {PII['jwt'][0]}, password={PII['password'][0]} and "
        f'{{"db_password": "{PII["password"][1]}"}}. {prose(seed + 100, 20)}'
    )


def test_planted_pii_reaches_no_file_of_the_version(workspace: Workspace, tmp_path: Path) -> None:
    corpus = tmp_path / "pii"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"note{i}.txt").write_text(pii_sentences(i), encoding="utf-8")
    lines = [json.dumps({"text": pii_sentences(i)}) for i in range(4, 10)]
    lines.append('{"text": "broken ' + PLANTED[0] + " " + PLANTED[5])  # malformed: quarantined
    (corpus / "rows.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with (corpus / "table.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text"])
        for i in range(10, 14):
            writer.writerow([pii_sentences(i)])
    cfg = files_config(corpus, name="pii", sample_records=100)
    info, _ = prepare_dataset(workspace, cfg, TOKENIZER, workers=1)
    assert info.stats["documents"] == 14
    assert info.stats["quarantined_at_source"] == {"bad_json": 1}
    pii_step = next(st for st in info.stats["steps"] if st["name"] == "pii")
    assert pii_step["changed"] == 14

    path = artifact(workspace, info)
    blobs = {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    blobs |= {
        f"decoded {s}": "\n".join(decoded_documents(path, s)).encode() for s in info.stats["splits"]
    }
    blobs["catalog row"] = json.dumps(info.to_dict()).encode()
    assert {"card.md", "samples.jsonl", "quarantine.jsonl", "stats.json"} <= set(blobs)
    for name, blob in blobs.items():
        for value in PLANTED:
            assert value.encode() not in blob, f"{value!r} survives in {name}"
    docs = b"".join(blob for name, blob in blobs.items() if name.startswith("docs/"))
    for placeholder in (b"<EMAIL>", b"<PHONE>", b"<IP>", b"<CARD>", b"<SECRET>"):
        assert placeholder in docs  # redacted in place, not dropped
    assert b"password=<SECRET>" in docs  # the name stays, the value goes


def test_exact_and_near_duplicates_are_dropped_and_counted(
    workspace: Workspace, tmp_path: Path
) -> None:
    corpus = tmp_path / "dups"
    corpus.mkdir()
    long = prose(1, 300)
    words = long.split()
    words[150] = "zebra"  # one word changed in 300: a near duplicate
    (corpus / "a.txt").write_text(long, encoding="utf-8")
    (corpus / "b.txt").write_text(long, encoding="utf-8")  # the same bytes
    (corpus / "c.txt").write_text("  " + long + "\n\n\n", encoding="utf-8")  # same once cleaned
    (corpus / "d.txt").write_text(" ".join(words), encoding="utf-8")
    for i in range(2, 8):
        (corpus / f"other{i}.txt").write_text(prose(i, 300), encoding="utf-8")
    info, _ = prepare_dataset(workspace, files_config(corpus, name="dups"), None, workers=1)
    s = info.stats
    assert s["dedup"] == {"exact": 2, "near": 1}
    assert s["drops"] == {"duplicate": 2, "near_duplicate": 1}
    assert s["documents"] == 7 and "tokens" not in s  # no tokenizer: documents only
    path = artifact(workspace, info)
    ids = {d["id"] for split in s["splits"] for d in read_jsonl(path / "docs" / f"{split}.jsonl")}
    assert "a.txt" in ids and not ids & {"b.txt", "c.txt", "d.txt"}  # the first one stays
    assert not (path / "tokens").exists()
    card = (path / "card.md").read_text()
    assert "exact: 2, near: 1" in card

    # Near-duplicate removal off: the changed copy stays.
    cfg = files_config(corpus, name="dups", dedup={"near": False})
    kept, created = prepare_dataset(workspace, cfg, None, workers=1)
    assert created and kept.stats["dedup"] == {"exact": 2, "near": 0}


# ----------------------------------------------------------------------- versions


def test_same_inputs_and_config_give_the_same_version_without_work(
    workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(prose(i), encoding="utf-8")
    first, created = prepare_dataset(workspace, files_config(corpus), TOKENIZER, workers=1)
    assert created and first.version == 1
    store = workspace.store
    published = store.keys("datasets")

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("an unchanged dataset was prepared again")

    with monkeypatch.context() as m:
        m.setattr(prepare_module, "_clean_and_split", no_work)
        again, created = prepare_dataset(workspace, files_config(corpus), TOKENIZER, workers=1)
        assert not created and (again.id, again.version) == (first.id, 1)
        # 'workers' changes how, not what: it is not part of the hash
        same, created = prepare_dataset(workspace, files_config(corpus, workers=2), TOKENIZER)
        assert not created and same.version == 1
    assert store.keys("datasets") == published == ["datasets/mixed/1"]
    assert not [p for p in (store.root / ".tmp").iterdir()]  # no scratch left behind

    # A file's content changes → version 2.
    (corpus / "3.txt").write_text(prose(33), encoding="utf-8")
    second, created = prepare_dataset(workspace, files_config(corpus), TOKENIZER, workers=1)
    assert created and second.version == 2 and second.content_hash != first.content_hash
    # A config value changes → version 3 (the tokenizer's config counts too → version 4).
    third, created = prepare_dataset(
        workspace, files_config(corpus, clean={"min_chars": 40}), TOKENIZER, workers=1
    )
    assert created and third.version == 3
    fourth, created = prepare_dataset(
        workspace, files_config(corpus), TokenizerConfig(vocab_size=300), workers=1
    )
    assert created and fourth.version == 4
    # Back to the first inputs and config → the first version again.
    (corpus / "3.txt").write_text(prose(3), encoding="utf-8")
    back, created = prepare_dataset(workspace, files_config(corpus), TOKENIZER, workers=1)
    assert not created and back.version == 1
    assert [i.version for i in list_dataset_versions(workspace, "mixed")] == [1, 2, 3, 4]


def test_a_version_number_taken_meanwhile_is_skipped(
    workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(prose(i), encoding="utf-8")
    store = workspace.store
    # A run that crashed between publishing datasets/mixed/1 and recording it.
    store.path("datasets/mixed/1").mkdir(parents=True)
    # Another writer publishes datasets/mixed/2 just before this run does.
    real_writer = store.writer
    raced: list[str] = []

    @contextmanager
    def racing_writer(key: str, **kwargs: Any) -> Iterator[Path]:
        with real_writer(key, **kwargs) as staging:
            yield staging
            if not raced:
                raced.append(key)
                store.path(key).mkdir(parents=True)
                (store.path(key) / "other.txt").write_text("another writer's file")

    monkeypatch.setattr(store, "writer", racing_writer)
    info, created = prepare_dataset(workspace, files_config(corpus), TOKENIZER, workers=1)
    assert created and raced == ["datasets/mixed/2"] and info.version == 3
    path = artifact(workspace, info)  # complete: publishing again found every file
    assert sorted(p.name for p in path.iterdir()) == [
        "MANIFEST.sha256",
        "card.md",
        "config.json",
        "docs",
        "quarantine.jsonl",
        "samples.jsonl",
        "stats.json",
        "tokenizer",
        "tokens",
    ]
    docs = [d["text"] for d in read_jsonl(path / "docs" / "train.jsonl")]
    assert docs and list(decoded_documents(path, "train")) == docs


def test_relative_paths_are_taken_from_root(
    workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    write_mixed(project)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = data_config("rel", [{"type": "files", "paths": ["corpus/*.txt", "corpus/d.csv"]}])
    info, _ = prepare_dataset(workspace, cfg, None, root=project, workers=1)
    assert info.stats["documents"] == 11  # 5 txt + 6 csv rows (short.txt is too short)
    with pytest.raises(GenloopError, match="'corpus' does not exist"):
        prepare_dataset(workspace, cfg, None, workers=1)  # no root: the working folder


def test_pretrained_tokenizer_from_a_folder(
    mixed: Mixed, workspace: Workspace, tmp_path: Path
) -> None:
    corpus, ws, info = mixed
    shutil.copytree(artifact(ws, info) / "tokenizer", tmp_path / "tok")
    tok = TokenizerConfig(kind="pretrained", path=Path("tok"))
    cfg = files_config(corpus, name="reuse")
    first, _ = prepare_dataset(workspace, cfg, tok, root=tmp_path, workers=1)
    path = artifact(workspace, first)
    assert (path / "tokenizer" / "tokenizer.json").read_bytes() == (
        tmp_path / "tok" / "tokenizer.json"
    ).read_bytes()
    docs = [d["text"] for d in read_jsonl(path / "docs" / "train.jsonl")]
    assert list(decoded_documents(path, "train")) == docs
    # The tokenizer's files are inputs: changing one makes a new version.
    config_file = tmp_path / "tok" / "tokenizer_config.json"
    config_file.write_text(config_file.read_text().replace("2048", "4096"))
    second, created = prepare_dataset(workspace, cfg, tok, root=tmp_path, workers=1)
    assert created and second.version == 2
    missing = TokenizerConfig(kind="pretrained", path=Path("no-such-tokenizer"))
    with pytest.raises(GenloopError, match="'no-such-tokenizer' does not exist"):
        prepare_dataset(workspace, cfg, missing, root=tmp_path, workers=1)
    with pytest.raises(GenloopError, match="no tokenizer at"):
        prepare_dataset(workspace, cfg, TokenizerConfig(kind="pretrained", path=corpus), workers=1)


# ----------------------------------------------------------------------- code and images


def test_code_corpus_quarantines_what_does_not_parse(workspace: Workspace, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    for i in range(6):
        body = "\n".join(f"    total += {j} * x  # step {j} of {i}" for j in range(i + 2))
        code = f'def f{i}(x: int) -> int:\n    """Function {i}."""\n    total = 0\n{body}\n'
        (src / ("pkg" if i % 2 else ".") / f"mod{i}.py").write_text(code + "    return total\n")
    (src / "broken.py").write_text("def broken(:\n    return 1\n")
    (src / "notes.txt").write_text("not code, not taken: .txt is no known language\n")
    cfg = data_config("code", [{"type": "code", "path": str(src)}], kind="code")
    info, _ = prepare_dataset(workspace, cfg, TOKENIZER, workers=1)
    assert info.kind == "code"
    steps = {st["name"]: st for st in info.stats["steps"]}
    assert steps["require_parse"]["dropped"] == {"unparseable": 1}
    assert info.stats["drops"] == {"unparseable": 1} and info.stats["documents"] == 6
    path = artifact(workspace, info)
    quarantine = read_jsonl(path / "quarantine.jsonl")
    assert [(q["id"], q["stage"], q["reason"]) for q in quarantine] == [
        ("broken.py", "require_parse", "unparseable")
    ]
    assert "line 1" in quarantine[0]["detail"]
    docs = [
        d for split in info.stats["splits"] for d in read_jsonl(path / "docs" / f"{split}.jsonl")
    ]
    assert sorted(d["id"] for d in docs) == sorted(
        [f"mod{i}.py" for i in (0, 2, 4)] + [f"pkg/mod{i}.py" for i in (1, 3, 5)]
    )
    assert all(d["meta"]["language"] == "python" for d in docs)
    assert sum(info.stats["splits"][s]["tokens"] for s in info.stats["splits"]) > 0


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


SHADES = {"bird": 128, "cat": 30, "dog": 220}  # each class has its own brightness


def test_image_folder_with_corrupt_files(workspace: Workspace, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pictures = tmp_path / "pictures"
    for name, shade in SHADES.items():
        (pictures / name).mkdir(parents=True)
        for i in range(7):
            noise = rng.integers(-10, 11, size=(16, 16, 3))
            pixels = np.clip(shade + noise, 0, 255).astype(np.uint8)
            (pictures / name / f"{i}.png").write_bytes(png(pixels))
    (pictures / "cat" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    whole = (pictures / "dog" / "0.png").read_bytes()
    (pictures / "dog" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    cfg = data_config(
        "pictures",
        [{"type": "images", "path": str(pictures)}],
        kind="images",
        images={"size": 8, "channels": 1},
        split={"val": 0.3, "test": 0.3},
    )
    info, _ = prepare_dataset(workspace, cfg, TOKENIZER, workers=1)  # no tokenizer for images
    s = info.stats
    assert info.kind == "images" and "tokens" not in s and "tokenizer" not in s
    assert s["drops"] == {"corrupt_image": 2} and s["documents"] == 21
    path = artifact(workspace, info)
    quarantine = read_jsonl(path / "quarantine.jsonl")
    assert sorted((q["id"], q["reason"]) for q in quarantine) == [
        ("cat/corrupt.png", "corrupt_image"),
        ("dog/truncated.png", "corrupt_image"),
    ]
    assert set(s["splits"]) == {"train", "val", "test"}
    for split, v in s["splits"].items():
        images, labels, classes = load_image_dataset(path / "images" / split)
        assert classes == sorted(SHADES)  # the same ids in every split
        assert images.shape == (v["documents"], 1, 8, 8)
        for image, label in zip(images, labels, strict=True):
            shade = SHADES[classes[int(label)]]
            assert abs(float(image.float().mean()) - shade) < 15
    assert not (path / "tokens").exists() and not (path / "tokenizer").exists()


def test_builtin_digits(workspace: Workspace) -> None:
    cfg = data_config(
        "digits",
        [{"type": "builtin", "name": "digits"}],
        kind="images",
        images={"size": 8},
        split={"val": 0.1, "test": 0.1},
    )
    info, _ = prepare_dataset(workspace, cfg, None, workers=1)
    assert 1700 <= info.stats["documents"] <= 1797
    path = artifact(workspace, info)
    seen: set[int] = set()
    for split, v in info.stats["splits"].items():
        images, labels, classes = load_image_dataset(path / "images" / split)
        assert classes == [str(i) for i in range(10)]
        assert images.shape == (v["documents"], 1, 8, 8)
        seen |= set(labels.tolist())
    assert seen == set(range(10))
    assert info.lineage["sources"][0]["kind"] == "builtin:digits"
