"""What the Models and Data views read: ``/v1/admin/models/variants`` (format, size,
measured numbers, parent of each version) and a dataset version's records, a page at a
time, with its images as PNG thumbnails served only from the verified store."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from genloop.workspace import Workspace

from .conftest import LiveServer, make_keys, make_workspace, running_server, serve_config

DOCS = [
    {"id": f"d{i}", "text": f"<b>doc {i}</b> " + "x" * (5000 if i == 3 else 10)} for i in range(45)
]


def _png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(out, format="PNG")
    return out.getvalue()


def _add_datasets(ws: Workspace) -> None:
    from genloop.data.images import write_image_dataset
    from genloop.data.records import Record
    from genloop.workspace.datasets import register_dataset_version

    def text(d: Path) -> None:
        (d / "docs").mkdir()
        (d / "docs" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DOCS))
        (d / "docs" / "val.jsonl").write_text(json.dumps({"id": "v0", "text": "held out"}) + "\n")

    register_dataset_version(
        ws, "docs", "h-docs", text, stats={"splits": {"train": {"documents": 45}}}
    )

    def images(d: Path) -> None:
        recs = [
            Record(f"i{i}", "images", text=f"square {c}", data=_png(rgb), label=c)
            for i, (c, rgb) in enumerate([("red", (255, 0, 0)), ("blue", (0, 0, 255))])
        ]
        write_image_dataset(recs, d / "images" / "train")

    register_dataset_version(ws, "pics", "h-pics", images, kind="images")

    def tokens(d: Path) -> None:
        (d / "tokens").mkdir()
        (d / "tokens" / "train.json").write_text('{"tokens": 10}')
        (d / "tokens" / "train_00000.bin").write_bytes(b"\0" * 20)

    register_dataset_version(ws, "toks", "h-toks", tokens, stats={"tokens": 10})

    def rows(d: Path) -> None:
        (d / "pairs").mkdir()
        row = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
        (d / "pairs" / "train.jsonl").write_text(json.dumps(row) + "\n")

    register_dataset_version(ws, "prefs", "h-prefs", rows, kind="dpo")


@pytest.fixture(scope="module")
def ws(
    tmp_path_factory: pytest.TempPathFactory, model_dirs: tuple[Path, Path]
) -> Iterator[Workspace]:
    from genloop.config import OptimizeConfig
    from genloop.evaluate.results import SuiteResult
    from genloop.evaluate.store import save_evaluation
    from genloop.optimize.run import optimize_model
    from genloop.workspace import registry

    workspace = make_workspace(tmp_path_factory.mktemp("browse"), model_dirs)
    optimize_model(workspace, "tiny@1", OptimizeConfig(quantize="int8"))  # → tiny@3
    measured = registry.resolve(workspace, "tiny@3")
    save_evaluation(
        workspace,
        measured.id,
        None,
        [SuiteResult("perplexity", {"perplexity": 301.5, "latency_ms_p50": 12.5})],
    )
    _add_datasets(workspace)
    yield workspace
    workspace.close()


@pytest.fixture(scope="module")
def server(ws: Workspace) -> Iterator[LiveServer]:
    with running_server(ws, serve_config(), make_keys(ws)) as s:
        yield s


@pytest.fixture(scope="module")
def admin(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(server.keys["admin"]) as c:
        yield c


def test_variants_name_format_size_measurements_and_parent(
    ws: Workspace, admin: httpx.Client
) -> None:
    rows = {r["ref"]: r for r in admin.get("/v1/admin/models/variants").json()["data"]}
    assert set(rows) == {"tiny@1", "tiny@2", "tiny@3"}
    parent, variant = rows["tiny@1"], rows["tiny@3"]
    assert parent["format"] == "fp32" and parent["parent"] is None
    assert variant["format"] == "int8" and variant["parent"] == "tiny@1"
    assert variant["transform"] == "int8-dynamic"
    # the size is the artifact's bytes on disk (its files, the manifest aside)
    for row in (parent, variant):
        root = ws.store.path(f"models/tiny/{row['version']}")
        files = [p for p in root.rglob("*") if p.is_file() and p.name != "MANIFEST.sha256"]
        assert row["size_bytes"] == sum(p.stat().st_size for p in files) > 0
        assert row["files"] == len(files)
    assert variant["latency_ms"] == 12.5 and variant["perplexity"] == 301.5
    assert variant["measured"]["perplexity"]["source"].startswith("evaluation ")
    assert parent["latency_ms"] is None and "latency_ms" not in parent["measured"]
    assert parent["aliases"] == ["production"]
    one = admin.get("/v1/admin/models/variants", params={"name": "tiny"}).json()["data"]
    assert len(one) == 3
    assert admin.get("/v1/admin/models/variants", params={"name": "../x"}).status_code == 400


def test_variants_need_the_admin_scope(server: LiveServer) -> None:
    with server.client(server.keys["generate"]) as c:
        assert c.get("/v1/admin/models/variants").status_code == 403
        assert c.get("/v1/admin/datasets/docs/1/records").status_code == 403


def test_text_records_page_through_a_split(admin: httpx.Client) -> None:
    base = "/v1/admin/datasets/docs/1/records"
    first = admin.get(base).json()
    assert first["storage"] == "docs" and first["splits"] == ["train", "val"]
    assert first["split"] == "train" and first["total"] == 45 and first["has_more"]
    assert [r["index"] for r in first["data"]] == list(range(20))
    assert first["data"][0]["record"]["text"] == "<b>doc 0</b> xxxxxxxxxx"  # as stored
    long = first["data"][3]
    assert long["truncated"] and len(long["record"]["text"]) == 4000
    last = admin.get(base, params={"offset": 40}).json()
    assert [r["index"] for r in last["data"]] == [40, 41, 42, 43, 44] and not last["has_more"]
    val = admin.get(base, params={"split": "val"}).json()
    assert val["data"][0]["record"]["text"] == "held out"
    missing = admin.get(base, params={"split": "test"})
    assert missing.status_code == 404 and "no split 'test'" in missing.json()["error"]["message"]
    assert admin.get(base, params={"split": "../docs"}).status_code == 400
    assert admin.get(base, params={"limit": 101}).status_code == 400


def test_rows_datasets_page_their_rows_whole(admin: httpx.Client) -> None:
    page = admin.get("/v1/admin/datasets/prefs/1/records").json()
    assert page["kind"] == "dpo" and page["storage"] == "pairs" and page["splits"] == ["train"]
    assert page["data"] == [
        {
            "index": 0,
            "record": {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            "truncated": False,
        }
    ]


def test_token_only_dataset_says_what_is_stored(admin: httpx.Client) -> None:
    page = admin.get("/v1/admin/datasets/toks/1/records").json()
    assert page["storage"] == "tokens" and page["splits"] == ["train"] and page["data"] == []


def test_images_with_captions_and_png_thumbnails(ws: Workspace, admin: httpx.Client) -> None:
    from PIL import Image

    page = admin.get("/v1/admin/datasets/pics/1/records").json()
    assert page["storage"] == "images" and page["total"] == 2
    assert [(r["caption"], r["label"]) for r in page["data"]] == [
        ("square red", "red"),
        ("square blue", "blue"),
    ]
    png = admin.get("/v1/admin/datasets/pics/1/images/train/1")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as im:
        assert im.format == "PNG" and im.size == (8, 8)
        assert im.convert("RGB").getpixel((4, 4)) == (0, 0, 255)
    assert admin.get("/v1/admin/datasets/pics/1/images/train/2").status_code == 404
    assert admin.get("/v1/admin/datasets/pics/1/images/..%2f..%2fx/0").status_code in (400, 404)
    assert admin.get("/v1/admin/datasets/docs/1/images/train/0").status_code == 404
    # a tampered image file is refused, not served
    path = ws.store.path("datasets/pics/1") / "images" / "train" / "images.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    refused = admin.get("/v1/admin/datasets/pics/1/images/train/0")
    assert refused.status_code >= 400 and "digest" in refused.json()["error"]["message"]
