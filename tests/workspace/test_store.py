"""The artifact store: no key leaves the root, atomic publishing, verified reading."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genloop.errors import ConflictError, IntegrityError, NotFoundError, UnsafePathError
from genloop.workspace.manifest import MANIFEST, read_manifest, verify_manifest, write_manifest
from genloop.workspace.paths import safe_join
from genloop.workspace.store import ArtifactStore

TRAVERSALS = [
    "",
    "..",
    "../x",
    "a/../../b",
    "a/..",
    "/etc/passwd",
    "/",
    "%2e%2e/x",
    "%2e%2e%2fx",
    "..%2f",
    "..%2fetc",
    "a\\..\\b",
    "..\\x",
    ".",
    "./a",
    "a/./b",
    "a//b",
    "a/",
    "~",
    "~/x",
    "\x00",
    "a\x00b",
    "a/\x00/b",
    ".hidden",
    "a.",
    "C:\\x",
    "a b",
    " a",
    "a\n",
    "\u2025",  # ‥ (two-dot leader)
    "\uff0e\uff0e",  # fullwidth '..'
    "x" * 129,
]


@pytest.fixture(scope="module")
def escape_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store whose tree holds symlinks pointing outside it (and one pointing inside)."""
    base = tmp_path_factory.mktemp("escape")
    root = base / "store"
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (root / "models" / "m").mkdir(parents=True)
    (root / "models" / "link").symlink_to(outside, target_is_directory=True)
    (root / "models" / "m" / "weights").symlink_to(outside / "secret")
    (root / "models" / "up").symlink_to("../..", target_is_directory=True)
    (root / "models" / "inside").symlink_to(root / "models" / "m", target_is_directory=True)
    # The same at the top, where random keys reach them more often.
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "up").symlink_to("..", target_is_directory=True)
    (root / "weights").symlink_to(outside / "secret")
    return root


def _is_within(path: Path, root: Path) -> bool:
    resolved, root = path.resolve(), root.resolve()
    return resolved == root or resolved.is_relative_to(root)


# Pieces that make traversal likely, mixed with arbitrary text (unicode, NUL, '/', '\\').
_PIECES = st.sampled_from(
    [
        "..",
        ".",
        "",
        "/",
        "\\",
        "%2e%2e",
        "%2f",
        "..%2f",
        "~",
        "\x00",
        "/etc/passwd",
        "models",
        "link",
        "up",
        "inside",
        "m",
        "weights",
        "secret",
        "a",
        "\u2025",
        "é",
    ]
)
KEYS = st.one_of(
    st.text(),
    st.lists(st.one_of(_PIECES, st.text(max_size=4)), max_size=6).map("/".join),
    st.lists(st.one_of(_PIECES, st.text(max_size=4)), max_size=6).map("".join),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=KEYS, relpath=KEYS)
def test_store_never_resolves_outside_root(escape_root: Path, key: str, relpath: str) -> None:
    store = ArtifactStore(escape_root)
    for resolve in (
        lambda: store.path(key),
        lambda: safe_join(escape_root, key),
        lambda: store.file("models/m", relpath),
        lambda: store.file(key, relpath),
    ):
        try:
            path = resolve()
        except UnsafePathError:
            continue
        assert _is_within(path, escape_root), (key, relpath, path)


@pytest.mark.parametrize("key", TRAVERSALS)
def test_traversal_attempts_refused(tmp_path: Path, key: str) -> None:
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(UnsafePathError):
        store.path(key)
    with pytest.raises(UnsafePathError):
        store.file("models/m/1", key)
    with pytest.raises(UnsafePathError), store.writer(key):
        pass
    assert not (tmp_path / "store").exists()  # refused before anything was created


def test_unsafe_key_error_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError, match=r"'\.\.'"):
        ArtifactStore(tmp_path).path("models/../x")


@pytest.mark.parametrize(
    ("key", "relpath"),
    [
        ("models/link", None),
        ("models/link/secret", None),
        ("models/up/x", None),
        ("models/m", "weights"),
    ],
)
def test_symlink_pointing_outside_refused(escape_root: Path, key: str, relpath: str | None) -> None:
    store = ArtifactStore(escape_root)
    with pytest.raises(UnsafePathError, match="outside"):
        store.path(key) if relpath is None else store.file(key, relpath)


def test_symlink_pointing_inside_allowed(escape_root: Path) -> None:
    store = ArtifactStore(escape_root)
    assert store.path("models/inside") == (escape_root / "models" / "m").resolve()


# --- publishing ---------------------------------------------------------------------------


def _write(store: ArtifactStore, key: str = "models/m/1") -> Path:
    with store.writer(key) as d:
        (d / "config.json").write_text('{"a": 1}')
        (d / "sub").mkdir()
        (d / "sub" / "model.bin").write_bytes(os.urandom(1024))
        (d / "with space.txt").write_text("hello")
    return store.path(key)


def _tmp_entries(store: ArtifactStore) -> list[Path]:
    tmp = store.root / ".tmp"
    return list(tmp.iterdir()) if tmp.exists() else []


def test_writer_publishes_with_manifest(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    path = _write(store)
    assert store.exists("models/m/1")
    assert set(read_manifest(path)) == {"config.json", "sub/model.bin", "with space.txt"}
    assert store.open_verified("models/m/1") == path
    assert store.keys() == ["models/m/1"]
    assert store.keys("models") == ["models/m/1"]
    assert _tmp_entries(store) == []


def test_writer_is_atomic_on_error(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(RuntimeError, match="boom"), store.writer("models/m/1") as d:
        (d / "config.json").write_text("{}")
        assert not store.path("models/m/1").exists()  # nothing visible while writing
        raise RuntimeError("boom")
    assert not store.exists("models/m/1")
    assert not store.path("models/m/1").exists()
    assert store.keys() == []
    assert _tmp_entries(store) == []


def test_writer_refuses_existing_key_unless_overwrite(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    _write(store)
    with pytest.raises(ConflictError, match="already exists"), store.writer("models/m/1"):
        pass
    with store.writer("models/m/1", overwrite=True) as d:
        (d / "new.txt").write_text("new")
    assert set(read_manifest(store.open_verified("models/m/1"))) == {"new.txt"}
    assert _tmp_entries(store) == []


def test_concurrent_writers_one_wins_other_conflicts(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(ConflictError), store.writer("models/m/1") as first:
        (first / "a").write_text("first")
        # A second writer starts after the first checked the key, and publishes first.
        with store.writer("models/m/1") as second:
            (second / "a").write_text("second")
    assert (store.open_verified("models/m/1") / "a").read_text() == "second"
    assert _tmp_entries(store) == []


def test_put_dir_copies_and_refuses_symlinks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_text("x")
    (src / MANIFEST).write_text("stale")
    store = ArtifactStore(tmp_path / "store")
    path = store.put_dir("datasets/d/1", src)
    assert set(verify_manifest(path)) == {"d/f.txt"}
    (src / "link").symlink_to(src / "d" / "f.txt")
    with pytest.raises(ConflictError, match="symbolic link"):
        store.put_dir("datasets/d/2", src)
    assert not store.exists("datasets/d/2")


def test_open_verified_missing_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="models/m/9"):
        ArtifactStore(tmp_path).open_verified("models/m/9")


def test_delete(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    _write(store)
    store.delete("models/m/1")
    assert not store.exists("models/m/1")
    store.delete("models/m/1")  # deleting twice is fine


# --- verification -------------------------------------------------------------------------


def _tamper_content(p: Path) -> str:
    data = bytearray((p / "sub" / "model.bin").read_bytes())
    data[10] ^= 0xFF  # same length, one byte flipped
    (p / "sub" / "model.bin").write_bytes(bytes(data))
    return "model.bin"


def _truncate(p: Path) -> str:
    with (p / "sub" / "model.bin").open("r+b") as f:
        f.truncate(100)
    return "model.bin"


def _add(p: Path) -> str:
    (p / "extra.safetensors").write_bytes(b"injected")
    return "extra.safetensors"


def _delete(p: Path) -> str:
    (p / "config.json").unlink()
    return "config.json"


def _symlink(p: Path) -> str:
    (p / "config.json").unlink()
    (p / "config.json").symlink_to("/etc/hostname")
    return "config.json"


@pytest.mark.parametrize("tamper", [_tamper_content, _truncate, _add, _delete, _symlink])
def test_tampered_artifact_refused_naming_file(
    tmp_path: Path, tamper: Callable[[Path], str]
) -> None:
    store = ArtifactStore(tmp_path / "store")
    path = _write(store)
    name = tamper(path)
    with pytest.raises(IntegrityError, match=name.replace(".", r"\.")) as exc:
        store.open_verified("models/m/1")
    assert "\n" not in str(exc.value)


def test_missing_or_malformed_manifest_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    path = _write(store)
    (path / MANIFEST).write_text("not a manifest\n")
    with pytest.raises(IntegrityError, match="line 1 is malformed"):
        store.open_verified("models/m/1")
    (path / MANIFEST).unlink()
    with pytest.raises(IntegrityError, match=f"no {MANIFEST}"):
        store.open_verified("models/m/1")


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils sha256sum")
def test_manifest_is_sha256sum_compatible(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    path = _write(store)
    ok = subprocess.run(
        ["sha256sum", "-c", "--strict", MANIFEST], cwd=path, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count(": OK") == 3
    _tamper_content(path)
    bad = subprocess.run(["sha256sum", "-c", MANIFEST], cwd=path, capture_output=True, text=True)
    assert bad.returncode != 0
    assert "sub/model.bin: FAILED" in bad.stdout


# Names a filesystem accepts: no '/', no NUL, not '.'/'..', at most 255 bytes.
_FILE_NAMES = st.text(
    st.characters(blacklist_characters="/\x00\n", blacklist_categories=["Cs"]),
    min_size=1,
    max_size=40,
).filter(lambda n: n not in (".", "..", MANIFEST) and len(n.encode()) <= 255)


@settings(max_examples=50, deadline=None)
@given(names=st.lists(_FILE_NAMES, min_size=1, max_size=5, unique=True))
def test_manifest_round_trips_any_file_name(names: list[str]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for i, name in enumerate(names):
            (d / name).write_bytes(str(i).encode())
        write_manifest(d)
        assert set(verify_manifest(d)) == set(names)


def test_manifest_refuses_newline_in_file_name(tmp_path: Path) -> None:
    (tmp_path / "a\nb").write_text("x")
    with pytest.raises(IntegrityError, match="newline"):
        write_manifest(tmp_path)
