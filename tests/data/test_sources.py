"""Each source kind on small data the tests make; URLs against a local server."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any

import pytest

from genloop.data.records import Quarantined, Record
from genloop.data.sources import (
    BuiltinSource,
    CodeSource,
    FilesSource,
    ImagesSource,
    Source,
    UrlSource,
    build_source,
    url,
)
from genloop.errors import ConfigError, GenloopError


def split(source: Source) -> tuple[list[Record], list[Quarantined]]:
    records: list[Record] = []
    bad: list[Quarantined] = []
    for item in source.records():
        if isinstance(item, Record):
            records.append(item)
        else:
            bad.append(item)
    return records, bad


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# -- files -----------------------------------------------------------------------------


def test_text_and_markdown_one_record_per_file(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "alpha")
    write(tmp_path / "sub" / "b.md", "# beta\n")
    write(tmp_path / "sub" / "skip.bin", b"\x00")
    write(tmp_path / ".hidden" / "c.txt", "hidden")

    source = build_source({"type": "files", "paths": str(tmp_path)})
    records, bad = split(source)

    assert [(r.id, r.text, r.meta["path"]) for r in records] == [
        ("a.txt", "alpha", "a.txt"),
        ("sub/b.md", "# beta\n", "sub/b.md"),
    ]
    assert bad == []
    assert all(r.source == "files" for r in records)
    assert source.describe()["files"] == 2


def test_jsonl_malformed_lines_are_quarantined_and_the_rest_goes_through(tmp_path: Path) -> None:
    lines = [
        json.dumps({"text": "first", "other": 1}),
        "{not json",
        json.dumps({"body": "no text field"}),
        "",
        json.dumps(["not", "an", "object"]),
        json.dumps({"text": 42}),
        json.dumps({"text": "last"}),
    ]
    write(tmp_path / "corpus.jsonl", "\n".join(lines) + "\n")

    records, bad = split(FilesSource([str(tmp_path / "corpus.jsonl")]))

    assert [(r.id, r.text) for r in records] == [
        ("corpus.jsonl:1", "first"),
        ("corpus.jsonl:7", "last"),
    ]
    assert records[0].meta == {"path": "corpus.jsonl", "field": "text"}
    assert [(q.id, q.reason) for q in bad] == [
        ("corpus.jsonl:2", "bad_json"),
        ("corpus.jsonl:3", "missing_field"),
        ("corpus.jsonl:5", "bad_json"),
        ("corpus.jsonl:6", "bad_field"),
    ]
    assert "line 2" in bad[0].detail
    assert all(q.source == "files" for q in bad)


def test_jsonl_field_selection_and_undecodable_line(tmp_path: Path) -> None:
    write(tmp_path / "c.jsonl", b'{"body": "ok"}\n{"body": "\xff\xfe"}\n{"body": "fine"}\n')

    records, bad = split(
        build_source({"type": "files", "paths": str(tmp_path / "c.jsonl"), "field": "body"})
    )

    assert [r.text for r in records] == ["ok", "fine"]
    assert [(q.id, q.reason) for q in bad] == [("c.jsonl:2", "undecodable")]


def test_json_list_and_object(tmp_path: Path) -> None:
    write(tmp_path / "list.json", json.dumps([{"t": "a"}, {"t": "b"}, {"x": "c"}]))
    write(tmp_path / "one.json", json.dumps({"t": "single"}))
    write(tmp_path / "broken.json", "[{")

    records, bad = split(FilesSource([str(tmp_path / "*.json")], field="t"))

    assert [(r.id, r.text) for r in records] == [
        ("list.json:0", "a"),
        ("list.json:1", "b"),
        ("one.json", "single"),
    ]
    assert [(q.id, q.reason) for q in bad] == [
        ("broken.json", "bad_json"),
        ("list.json:2", "missing_field"),
    ]


def test_csv_column_selection(tmp_path: Path) -> None:
    write(
        tmp_path / "t.csv",
        'id,title,text\n1,Hello,"multi\nline body"\n2,Short\n3,Third,third body\n',
    )
    records, bad = split(FilesSource(str(tmp_path / "t.csv")))
    assert [(r.id, r.text) for r in records] == [
        ("t.csv:2", "multi\nline body"),
        ("t.csv:5", "third body"),
    ]
    assert [(q.id, q.reason) for q in bad] == [("t.csv:4", "missing_field")]

    records, _ = split(FilesSource(str(tmp_path / "t.csv"), columns=["title", "text"]))
    assert records[0].text == "Hello\nmulti\nline body"
    assert records[0].meta == {"path": "t.csv", "columns": ["title", "text"]}

    _, bad = split(FilesSource(str(tmp_path / "t.csv"), columns=["nope"]))
    assert [(q.id, q.reason) for q in bad] == [("t.csv", "missing_field")]


def test_parquet_streams_row_groups_with_column_selection(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "title": ["t0", "t1", "t2", "t3", "t4"],
            "body": ["b0", "b1", None, "b3", "b4"],
            "n": [0, 1, 2, 3, 4],
        }
    )
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)

    records, bad = split(
        build_source(
            {"type": "files", "paths": [str(tmp_path / "d.parquet")], "columns": ["title", "body"]}
        )
    )

    assert [(r.id, r.text) for r in records] == [
        ("d.parquet:0", "t0\nb0"),
        ("d.parquet:1", "t1\nb1"),
        ("d.parquet:3", "t3\nb3"),
        ("d.parquet:4", "t4\nb4"),
    ]
    assert [(q.id, q.reason) for q in bad] == [("d.parquet:2", "bad_field")]

    write(tmp_path / "junk.parquet", b"not parquet at all")
    _, bad = split(FilesSource(str(tmp_path / "junk.parquet")))
    assert [(q.id, q.reason) for q in bad] == [("junk.parquet", "unreadable")]


def test_undecodable_text_file_is_quarantined(tmp_path: Path) -> None:
    write(tmp_path / "good.txt", "fine")
    write(tmp_path / "bad.txt", b"\xff\xfe\xfa latin garbage \xe9")

    records, bad = split(FilesSource(str(tmp_path)))

    assert [r.id for r in records] == ["good.txt"]
    assert [(q.id, q.reason) for q in bad] == [("bad.txt", "undecodable")]


def test_files_encoding(tmp_path: Path) -> None:
    write(tmp_path / "latin.txt", "café".encode("latin-1"))
    write(tmp_path / "bom.txt", "\ufeffwith a byte-order mark".encode())

    assert split(FilesSource(str(tmp_path / "bom.txt")))[0][0].text == "with a byte-order mark"
    assert split(FilesSource(str(tmp_path / "latin.txt")))[1][0].reason == "undecodable"
    latin = build_source(
        {"type": "files", "paths": [str(tmp_path / "latin.txt")], "encoding": "latin-1"}
    )
    assert split(latin)[0][0].text == "café"
    with pytest.raises(GenloopError, match="unknown encoding 'klingon'"):
        FilesSource(str(tmp_path), encoding="klingon")


def test_recursive_glob_paths_are_relative_to_its_base(tmp_path: Path) -> None:
    write(tmp_path / "data" / "x" / "y" / "deep.txt", "deep")
    write(tmp_path / "data" / "top.txt", "top")
    write(tmp_path / "data" / "x" / "other.md", "not matched")

    records, _ = split(FilesSource(str(tmp_path / "data" / "**" / "*.txt")))
    assert [r.id for r in records] == ["top.txt", "x/y/deep.txt"]

    # A relative pattern is taken from root.
    source = build_source({"type": "files", "paths": "data/x/**/*.txt"}, root=tmp_path)
    assert [r.id for r in split(source)[0]] == ["y/deep.txt"]


def test_symlinks_never_lead_outside_the_base(tmp_path: Path) -> None:
    outside = write(tmp_path / "outside" / "secret.txt", "SECRET")
    base = tmp_path / "base"
    write(base / "ok.txt", "ok")
    (base / "link.txt").symlink_to(outside)
    (base / "linkdir").symlink_to(outside.parent, target_is_directory=True)

    for source in (FilesSource(str(base)), FilesSource(str(base / "**" / "*.txt"))):
        records, bad = split(source)
        assert [r.id for r in records] == ["ok.txt"]
        assert [(q.id, q.reason) for q in bad] == [("link.txt", "outside_base")]
        assert all("SECRET" not in (r.text or "") for r in records)


def test_fingerprint_is_stable_and_follows_content(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "one")
    write(tmp_path / "b.jsonl", '{"text": "two"}\n')
    source = FilesSource(str(tmp_path))

    first = source.fingerprint()
    assert first == source.fingerprint() == FilesSource(str(tmp_path)).fingerprint()
    assert len(first) == 64

    write(tmp_path / "a.txt", "one, changed")
    changed = source.fingerprint()
    assert changed != first

    (tmp_path / "a.txt").rename(tmp_path / "renamed.txt")
    assert source.fingerprint() != changed


def test_build_source_errors_name_the_problem(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "x")
    with pytest.raises(ConfigError, match="'type'"):
        build_source({"paths": "x"})
    with pytest.raises(ConfigError, match="'type'"):
        build_source({"type": "ftp"})
    with pytest.raises(ConfigError, match=r"unknown key 'feild'.*field"):
        build_source({"type": "files", "paths": str(tmp_path), "feild": "x"})
    with pytest.raises(ConfigError, match="missing key 'paths'"):
        build_source({"type": "files"})
    with pytest.raises(ConfigError, match="'max_bytes' must be an integer"):
        build_source({"type": "code", "path": str(tmp_path), "max_bytes": "big"})
    with pytest.raises(ConfigError, match="'allow_private' must be true or false"):
        build_source({"type": "url", "urls": "http://x", "allow_private": "yes"})
    with pytest.raises(GenloopError, match="does not exist"):
        build_source({"type": "files", "paths": str(tmp_path / "nope.txt")})
    with pytest.raises(GenloopError, match="does not exist"):
        build_source({"type": "images", "path": str(tmp_path / "missing")})
    with pytest.raises(GenloopError, match="matches no supported file"):
        build_source({"type": "files", "paths": str(tmp_path / "*.jsonl")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(GenloopError, match="matches no supported file"):
        build_source({"type": "files", "paths": str(tmp_path / "empty")})
    with pytest.raises(GenloopError, match="unknown name"):
        build_source({"type": "builtin", "name": "wikipedia"})


def test_config_models_build_sources(tmp_path: Path) -> None:
    """prepare builds sources from genloop.config models' model_dump(): every key they
    have (None meaning unset, Path values) must be understood."""
    from pydantic import TypeAdapter

    from genloop import config

    write(tmp_path / "a.txt", "x")
    write(tmp_path / "img" / "cats" / "1.png", b"png")
    write(tmp_path / "src" / "m.py", "x = 1\n")
    from datasets import Dataset

    Dataset.from_dict({"text": ["row"]}).save_to_disk(tmp_path / "ds")
    specs: list[dict[str, Any]] = [
        {"type": "files", "paths": [str(tmp_path / "*.txt")]},
        {"type": "code", "path": str(tmp_path / "src")},
        {"type": "builtin", "name": "digits"},
        {"type": "url", "urls": ["https://example.org/"]},
        {"type": "hf_disk", "path": str(tmp_path / "ds")},
        {"type": "images", "path": str(tmp_path / "img")},
    ]
    adapter: TypeAdapter[Any] = TypeAdapter(config.Source)
    for spec in specs:
        source = build_source(adapter.validate_python(spec).model_dump())
        assert source.kind.startswith(spec["type"])
    code = build_source(adapter.validate_python(specs[1]).model_dump())
    assert [r.id for r in split(code)[0]] == ["m.py"]


# -- code ------------------------------------------------------------------------------


def test_code_languages_filters_and_size_limit(tmp_path: Path) -> None:
    write(tmp_path / "main.py", "print('hi')\n")
    write(tmp_path / "web" / "app.ts", "let x = 1;\n")
    write(tmp_path / "web" / "app.min.js", "minified\n")
    write(tmp_path / "web" / "node_modules" / "dep.js", "dep\n")
    write(tmp_path / "lib" / "util.go", "package lib\n")
    write(tmp_path / "run.sh", "echo hi\n")
    write(tmp_path / "README.txt", "not code\n")
    write(tmp_path / ".git" / "hook.py", "hidden\n")
    write(tmp_path / "__pycache__" / "x.py", "cache\n")
    write(tmp_path / "gen" / "big.py", "x = 1\n" * 400)

    source = build_source(
        {"type": "code", "path": str(tmp_path), "exclude": ["*.min.js"], "max_bytes": 1000}
    )
    records, bad = split(source)

    assert {r.id: r.meta["language"] for r in records} == {
        "main.py": "python",
        "run.sh": "shell",
        "lib/util.go": "go",
        "web/app.ts": "typescript",
    }
    assert all(r.meta["path"] == r.id and r.source == "code" for r in records)
    assert [(q.id, q.reason) for q in bad] == [("gen/big.py", "too_large")]

    by_language = CodeSource(tmp_path, languages=["go", "shell"])
    assert [r.id for r in split(by_language)[0]] == ["run.sh", "lib/util.go"]
    with pytest.raises(GenloopError, match="unknown language"):
        CodeSource(tmp_path, languages=["cobol"])

    only_python = CodeSource(tmp_path, extensions=["py"], exclude=["gen"])
    assert [r.id for r in split(only_python)[0]] == ["main.py"]
    assert (
        only_python.fingerprint()
        == CodeSource(tmp_path, extensions=[".py"], exclude=["gen"]).fingerprint()
    )


# -- images ----------------------------------------------------------------------------


def test_images_labels_from_sub_folders_raw_bytes(tmp_path: Path) -> None:
    write(tmp_path / "cats" / "1.png", b"\x89PNG fake one")
    write(tmp_path / "dogs" / "2.JPG", b"\xff\xd8 fake two")
    write(tmp_path / "dogs" / "puppies" / "3.jpeg", b"\xff\xd8 fake three")
    write(tmp_path / "loose.png", b"\x89PNG loose")
    write(tmp_path / "cats" / "notes.txt", "ignored")

    source = build_source({"type": "images", "path": str(tmp_path)})
    records, bad = split(source)

    assert [(r.id, r.label, r.data) for r in records] == [
        ("loose.png", None, b"\x89PNG loose"),
        ("cats/1.png", "cats", b"\x89PNG fake one"),
        ("dogs/2.JPG", "dogs", b"\xff\xd8 fake two"),
        ("dogs/puppies/3.jpeg", "dogs", b"\xff\xd8 fake three"),
    ]
    assert bad == []
    assert records[1].meta == {"path": "cats/1.png"} and records[1].text is None
    assert source.describe()["labels"] == ["cats", "dogs"]
    assert isinstance(source, ImagesSource)
    assert [r.id for r in split(ImagesSource(tmp_path, extensions=["png"]))[0]] == [
        "loose.png",
        "cats/1.png",
    ]


# -- hf_disk ---------------------------------------------------------------------------


def test_hf_disk_dataset_and_dataset_dict(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"text": ["a", "b", None], "n": [1, 2, 3]}).save_to_disk(tmp_path / "ds")
    records, bad = split(build_source({"type": "hf_disk", "path": str(tmp_path / "ds")}))
    assert [(r.id, r.text) for r in records] == [("0", "a"), ("1", "b")]
    assert [(q.id, q.reason) for q in bad] == [("2", "bad_field")]

    DatasetDict(
        {
            "train": Dataset.from_dict({"content": ["x", "y"]}),
            "test": Dataset.from_dict({"content": ["z"]}),
        }
    ).save_to_disk(tmp_path / "dd")
    train = build_source({"type": "hf_disk", "path": str(tmp_path / "dd"), "field": "content"})
    assert [(r.id, r.text) for r in split(train)[0]] == [("train:0", "x"), ("train:1", "y")]
    test = build_source(
        {"type": "hf_disk", "path": str(tmp_path / "dd"), "field": "content", "split": "test"}
    )
    assert [r.text for r in split(test)[0]] == ["z"]
    assert train.fingerprint() == train.fingerprint() != test.fingerprint()

    DatasetDict({"only": Dataset.from_dict({"text": ["o"]})}).save_to_disk(tmp_path / "one")
    only = build_source({"type": "hf_disk", "path": tmp_path / "one", "split": None})
    assert [(r.id, r.text) for r in split(only)[0]] == [("only:0", "o")]

    with pytest.raises(GenloopError, match="no split 'valid'"):
        build_source({"type": "hf_disk", "path": str(tmp_path / "dd"), "split": "valid"})
    with pytest.raises(GenloopError, match="no column 'text'"):
        build_source({"type": "hf_disk", "path": str(tmp_path / "dd")})


# -- builtin ---------------------------------------------------------------------------


def test_python_stdlib_has_sources_but_no_test_packages() -> None:
    source = BuiltinSource("python-stdlib")
    records, bad = split(source)  # ~12 MB, read in well under a second

    ids = {r.id for r in records}
    assert len(records) > 300 and bad == []
    assert {"json/decoder.py", "os.py", "collections/__init__.py"} <= ids
    for record_id in ids:
        parts = record_id.split("/")
        assert "test" not in parts and "tests" not in parts and "idle_test" not in parts
        assert "site-packages" not in parts
    decoder = next(r for r in records if r.id == "json/decoder.py")
    assert decoder.source == "builtin:python-stdlib"
    assert decoder.meta == {"path": "json/decoder.py", "language": "python"}
    assert "class JSONDecoder" in (decoder.text or "")
    assert source.describe()["files"] == len(records)
    assert source.fingerprint() == source.fingerprint()


def test_python_docs_docstrings_and_topics() -> None:
    source = build_source({"type": "builtin", "name": "python-docs"})
    first = list(itertools.islice(source.records(), 50))
    assert all(isinstance(r, Record) and r.text for r in first)
    assert {r.meta["type"] for r in first if isinstance(r, Record)} >= {"module", "function"}

    from genloop.data.sources import builtin

    topics = list(itertools.islice(BuiltinSource("python-docs")._topics(), 5))
    assert topics and all(isinstance(t, Record) and t.id.startswith("topics:") for t in topics)
    tree = __import__("ast").parse(
        '"""Mod."""\nclass A:\n    """Cls."""\n    def f(self):\n        """Fn."""\n'
    )
    assert list(builtin._docstrings(tree)) == [
        ("", "module", "Mod."),
        ("A", "class", "Cls."),
        ("A.f", "function", "Fn."),
    ]


def test_digits_are_png_images_with_labels() -> None:
    from PIL import Image

    records, bad = split(build_source({"type": "builtin", "name": "digits"}))

    assert len(records) == 1797 and bad == []
    assert {r.label for r in records} == set(range(10))
    first = records[0]
    assert (
        first.id == "digits:0" and first.meta == {"index": 0} and first.source == "builtin:digits"
    )
    image = Image.open(io.BytesIO(first.data or b""))
    assert image.format == "PNG" and image.size == (8, 8) and image.mode == "L"
    assert image.getextrema()[1] > 200  # type: ignore[operator]  # 0..16 scaled to 0..255


# -- url -------------------------------------------------------------------------------

PAGE = b"""<!doctype html><html><head><title>The  Title</title>
<style>body { color: red }</style><script>var tracking = 1;</script></head>
<body><nav><a href="/">Home</a> <a href="/about">About</a></nav>
<header>Site banner</header>
<main><h1>Main heading</h1><p>First paragraph   with
  wrapped text &amp; an entity.</p><ul><li>one</li><li>two</li></ul></main>
<aside>Buy things</aside><footer>Copyright</footer></body></html>"""


@dataclass
class Server:
    port: int
    routes: dict[str, tuple[int, dict[str, str], bytes]]
    requests: list[tuple[str, str]] = field(default_factory=list)  # (path, Host header)
    user_agents: set[str] = field(default_factory=set)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
def server() -> Iterator[Server]:
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {
        "/robots.txt": (
            200,
            {"Content-Type": "text/plain"},
            b"User-agent: *\nDisallow: /private/\n",
        ),
        "/page.html": (200, {"Content-Type": "text/html; charset=utf-8"}, PAGE),
        "/plain.txt": (200, {"Content-Type": "text/plain"}, b"just text"),
        "/data.json": (200, {"Content-Type": "application/json"}, b'{"a": 1}'),
        "/private/secret.html": (200, {"Content-Type": "text/html"}, b"<p>secret</p>"),
        "/image.png": (200, {"Content-Type": "image/png"}, b"\x89PNG"),
        "/big.txt": (200, {"Content-Type": "text/plain"}, b"x" * 5000),
        "/big-unsized.txt": (200, {"Content-Type": "text/plain", "X-No-Length": "1"}, b"y" * 5000),
        "/redirect": (302, {"Location": "/page.html"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/to-private": (302, {"Location": "http://10.0.0.1/x"}, b""),
        "/slow": (200, {"Content-Type": "text/plain", "X-Sleep": "2"}, b"late"),
    }
    state = Server(port=0, routes=routes)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append((self.path, self.headers.get("Host", "")))
            state.user_agents.add(self.headers.get("User-Agent", ""))
            status, headers, body = state.routes.get(
                self.path, (404, {"Content-Type": "text/plain"}, b"no")
            )
            if "X-Sleep" in headers:
                time.sleep(float(headers["X-Sleep"]))
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            if "X-No-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            # The client may stop reading (size limit, timeout): expected.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def fetch_one(source: UrlSource) -> Record | Quarantined:
    (item,) = list(source.records())
    return item


def test_url_html_main_text_and_title(server: Server) -> None:
    item = fetch_one(UrlSource(server.url("/page.html"), allow_private=True))

    assert isinstance(item, Record)
    assert item.id == server.url("/page.html") and item.source == "url"
    assert item.meta["title"] == "The Title"
    assert item.meta["content_type"] == "text/html"
    assert (
        item.text
        == "The Title\n\nMain heading\n\nFirst paragraph with wrapped text & an entity.\n\none\ntwo"
    )
    for chrome in ("tracking", "Home", "Site banner", "Buy things", "Copyright", "color"):
        assert chrome not in item.text


def test_url_plain_json_redirect_and_errors(server: Server) -> None:
    urls = [server.url(p) for p in ("/plain.txt", "/data.json", "/redirect", "/missing", "/loop")]
    source = build_source({"type": "url", "urls": urls, "allow_private": True})
    items = list(source.records())

    assert [type(i).__name__ for i in items[:3]] == ["Record", "Record", "Record"]
    assert [i.text for i in items[:2] if isinstance(i, Record)] == ["just text", '{"a": 1}']
    assert isinstance(items[2], Record) and items[2].meta["final_url"] == server.url("/page.html")
    assert [(i.reason) for i in items[3:] if isinstance(i, Quarantined)] == [
        "http_error",
        "too_many_redirects",
    ]
    assert sum(1 for path, _ in server.requests if path == "/loop") == url.MAX_REDIRECTS + 1


def test_url_robots_txt_is_respected(server: Server) -> None:
    item = fetch_one(UrlSource(server.url("/private/secret.html"), allow_private=True))

    assert isinstance(item, Quarantined) and item.reason == "robots_disallowed"
    assert [path for path, _ in server.requests] == ["/robots.txt"]
    assert server.user_agents == {url.USER_AGENT}


def test_url_robots_txt_for_the_user_agent_or_not_at_all(server: Server) -> None:
    server.routes["/robots.txt"] = (
        200,
        {"Content-Type": "text/plain"},
        b"User-agent: mybot\nDisallow: /\n\nUser-agent: *\nDisallow:\n",
    )
    page = server.url("/plain.txt")
    assert isinstance(fetch_one(UrlSource(page, allow_private=True)), Record)
    item = fetch_one(UrlSource(page, allow_private=True, user_agent="mybot"))
    assert isinstance(item, Quarantined) and item.reason == "robots_disallowed"
    assert "mybot" in server.user_agents

    server.requests.clear()
    ignoring = UrlSource(page, allow_private=True, user_agent="mybot", respect_robots=False)
    assert isinstance(fetch_one(ignoring), Record)
    assert [path for path, _ in server.requests] == ["/plain.txt"]


def test_url_missing_robots_txt_allows_everything(server: Server) -> None:
    del server.routes["/robots.txt"]
    assert isinstance(
        fetch_one(UrlSource(server.url("/private/secret.html"), allow_private=True)), Record
    )


def test_url_size_limit_and_content_type(server: Server) -> None:
    urls = [server.url(p) for p in ("/big.txt", "/big-unsized.txt", "/image.png", "/plain.txt")]
    items = list(UrlSource(urls, allow_private=True, max_bytes=1000).records())

    assert [(i.reason if isinstance(i, Quarantined) else "ok") for i in items] == [
        "too_large",
        "too_large",
        "bad_content_type",
        "ok",
    ]
    assert "Content-Length" in items[0].detail  # type: ignore[union-attr]
    assert "passed the 1000-byte limit" in items[1].detail  # type: ignore[union-attr]


def test_url_timeout(server: Server) -> None:
    started = time.monotonic()
    item = fetch_one(UrlSource(server.url("/slow"), allow_private=True, timeout_s=0.3))
    assert isinstance(item, Quarantined) and item.reason == "fetch_failed"
    assert time.monotonic() - started < 1.5


def test_url_fingerprint_fetches_once(server: Server) -> None:
    source = UrlSource([server.url("/plain.txt"), server.url("/image.png")], allow_private=True)
    fingerprint = source.fingerprint()
    seen = len(server.requests)
    assert [type(i).__name__ for i in source.records()] == ["Record", "Quarantined"]
    assert source.fingerprint() == fingerprint
    assert len(server.requests) == seen  # records() reused what fingerprint() fetched

    server.routes["/plain.txt"] = (200, {"Content-Type": "text/plain"}, b"new text")
    again = UrlSource([server.url("/plain.txt"), server.url("/image.png")], allow_private=True)
    assert again.fingerprint() != fingerprint


@pytest.fixture
def no_connections(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every attempt to open a connection is recorded and refused."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise AssertionError(f"a connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_url_private_addresses_refused_before_any_connection(
    server: Server, no_connections: list[object]
) -> None:
    urls = [
        server.url("/plain.txt"),
        server.url("/plain.txt", host="localhost"),
        "http://10.0.0.1/",
        "http://192.168.1.1/admin",
        "http://169.254.169.254/latest/meta-data/",
        f"http://[::1]:{server.port}/plain.txt",
        "http://0.0.0.0/",
        "http://[::ffff:127.0.0.1]/",
        "http://2130706433/",  # 127.0.0.1 written as one number
        "https://224.0.0.1/",
    ]
    items = list(UrlSource(urls).records())

    blocked = [i for i in items if isinstance(i, Quarantined) and i.reason == "blocked_address"]
    assert blocked == items
    assert "127.0.0.1" in blocked[0].detail and "169.254.169.254" in blocked[4].detail
    assert no_connections == []
    assert server.requests == []


def test_url_bad_schemes(no_connections: list[object]) -> None:
    items = list(
        UrlSource(["ftp://example.org/file", "file:///etc/passwd", "gopher://x/"]).records()
    )
    assert [i.reason for i in items if isinstance(i, Quarantined)] == ["bad_scheme"] * 3
    assert no_connections == []


def test_public_address_rule() -> None:
    for text in ("8.8.8.8", "2606:4700:4700::1111", "93.184.216.34"):
        assert url.is_public(ip_address(text)), text
    for text in (
        "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.0.1", "169.254.169.254", "100.64.0.1",
        "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1",
        "fc00::1", "ff02::1", "::ffff:10.0.0.1", "2002:7f00:1::", "64:ff9b::a00:1",
    ):  # fmt: skip
        assert not url.is_public(ip_address(text)), text


def test_url_connects_to_the_checked_address_and_rechecks_redirects(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Treat 127.0.0.1 as public and make 'site.test' resolve to it: the fetch must go to
    the address that was checked (the name cannot be resolved again), keep the Host
    header, and refuse a redirect to a private address."""
    real_resolve = url.resolve

    def resolve(host: str, port: int) -> list[url.IPAddress]:
        return [IPv4Address("127.0.0.1")] if host == "site.test" else real_resolve(host, port)

    monkeypatch.setattr(url, "resolve", resolve)
    monkeypatch.setattr(url, "is_public", lambda address: str(address) == "127.0.0.1")

    items = list(
        UrlSource(
            [
                server.url("/plain.txt", host="site.test"),
                server.url("/to-private", host="site.test"),
            ]
        ).records()
    )

    assert isinstance(items[0], Record) and items[0].text == "just text"
    assert ("/plain.txt", f"site.test:{server.port}") in server.requests
    assert isinstance(items[1], Quarantined) and items[1].reason == "blocked_address"
    assert items[1].id == server.url("/to-private", host="site.test")
    assert "redirected to http://10.0.0.1/x" in items[1].detail


def test_html_main_text_without_main_keeps_body_and_pre() -> None:
    title, text = url.html_main_text(
        "<title>T</title><body><div>Intro</div><pre>def f():\n    return 1\n</pre><br>end</body>"
    )
    assert title == "T"
    assert text == "T\n\nIntro\ndef f():\n    return 1\n\nend"
