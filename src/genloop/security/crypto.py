"""Encryption at rest for the text users typed: prompts, responses, corrections, comments.

AES-256-GCM (``cryptography``'s AEAD) with a fresh 96-bit nonce per value. A stored value
is ``b"GL1" | key id (4 bytes) | nonce (12) | ciphertext and tag``: the key id names the
key it was sealed with, so a **key ring** can hold the new key and the old ones while
:func:`rotate_secret` re-encrypts, and every row stays readable meanwhile.

Where the keys come from, first match wins:

* ``$GENLOOP_SECRET_KEY``: one key, or several separated by commas (the first encrypts,
  all decrypt). Replicas on several machines must share it. Each key is 32 bytes written
  as URL-safe base64 (44 characters) or hex (64); make one with
  ``python -c "import base64,os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())"``.
* ``<workspace>/secret.key``: one key per line, the first encrypts. Created with mode 0600
  on first use; refused if group or others can read it. A running process notices a
  change within :data:`RELOAD_INTERVAL_S` and takes the new ring (so ``rotate-secret``
  needs no server restart); a ring that fails to load keeps the old one, with a warning.

Losing every key loses the encrypted text (by design: nothing else can read it). What this
does not protect: a process that holds the key (the server) and memory; a value's length
(ciphertext length = text length + 35 bytes); which row a value sits in (an attacker who
can write the database could swap two values of the same table).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genloop.errors import ConfigError, GenloopError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from genloop.workspace.workspace import Workspace

log = logging.getLogger(__name__)

ENV_SECRET_KEY = "GENLOOP_SECRET_KEY"  # noqa: S105 - the variable's name, not a secret
KEY_FILE = "secret.key"
SECRET_STORE_FILE = "secrets.json"  # noqa: S105 - a file name (genloop.security.secret_store)
MAGIC = b"GL1"
KEY_BYTES = 32
_KEY_ID_BYTES = 4
_NONCE_BYTES = 12
_HEADER = len(MAGIC) + _KEY_ID_BYTES + _NONCE_BYTES
RELOAD_INTERVAL_S = 1.0  # how often a process looks at its key file for a new ring

# The columns this module encrypts, by table: rotation and privacy export/erase read them.
ENCRYPTED_COLUMNS: dict[str, tuple[str, ...]] = {
    "requests": ("prompt_enc", "response_enc"),
    "feedback": ("correction_enc", "comment_enc"),
}


class DecryptionError(GenloopError):
    """A stored value cannot be decrypted: unknown key, or tampered with."""

    http_status = 500


def key_id(key: bytes) -> bytes:
    """The 4-byte name of a key stored with each value (not secret: a hash prefix)."""
    return hashlib.sha256(b"genloop key id\x00" + key).digest()[:_KEY_ID_BYTES]


@dataclass(frozen=True)
class _Ring:
    """One loaded key ring; replaced whole on reload, so a reader never sees half of one."""

    keys: list[bytes]
    aeads: dict[bytes, AESGCM]  # by key id
    primary: bytes  # the encrypting key's id
    pseudonym_keys: list[bytes]

    @classmethod
    def of(cls, keys: list[bytes], source: str) -> _Ring:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if not keys:
            raise ConfigError(f"no encryption key in {source}")
        for key in keys:
            if len(key) != KEY_BYTES:
                raise ConfigError(f"an encryption key in {source} is not {KEY_BYTES} bytes")
        keys = list(dict.fromkeys(keys))  # de-duplicated, order kept
        return cls(
            keys=keys,
            aeads={key_id(k): AESGCM(k) for k in keys},
            primary=key_id(keys[0]),
            # pseudonyms for the audit log: HMAC with a key derived from each ring key
            pseudonym_keys=[hashlib.sha256(b"genloop pseudonym\x00" + k).digest() for k in keys],
        )


class Cipher:
    """Encrypt with the first key of the ring; decrypt with whichever key sealed a value.

    ``watch``: the key file the ring came from; it is looked at (one ``stat``) at most every
    :data:`RELOAD_INTERVAL_S`, and a changed file is loaded as the new ring.
    """

    def __init__(self, keys: list[bytes], source: str, *, watch: Path | None = None) -> None:
        self.source = source
        self._ring = _Ring.of(keys, source)
        self._watch = watch
        self._stamp = _file_stamp(watch) if watch is not None else None
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the keys
        ring = self._current()
        return f"Cipher(primary={ring.primary.hex()}, keys={len(ring.keys)}, source={self.source})"

    def _current(self) -> _Ring:
        """The ring, reloaded first if the watched key file changed."""
        if self._watch is None or time.monotonic() - self._checked < RELOAD_INTERVAL_S:
            return self._ring
        with self._lock:
            if time.monotonic() - self._checked < RELOAD_INTERVAL_S:
                return self._ring
            self._checked = time.monotonic()
            try:
                stamp = _file_stamp(self._watch)
                if stamp != self._stamp:
                    self._ring = _Ring.of(_read_key_file(self._watch), self.source)
                    self._stamp = stamp
                    log.info("reloaded the encryption key ring from %s", self._watch)
            except (OSError, GenloopError) as exc:
                log.warning("kept the old key ring: %s could not be loaded (%s)", self._watch, exc)
            return self._ring

    @property
    def primary_id(self) -> str:
        return self._current().primary.hex()

    @property
    def key_ids(self) -> list[str]:
        return [key_id(k).hex() for k in self._current().keys]

    def encrypt(self, text: str) -> bytes:
        ring = self._current()
        nonce = os.urandom(_NONCE_BYTES)
        sealed = ring.aeads[ring.primary].encrypt(nonce, text.encode("utf-8"), MAGIC)
        return MAGIC + ring.primary + nonce + sealed

    def decrypt(self, blob: bytes) -> str:
        from cryptography.exceptions import InvalidTag

        blob = bytes(blob)  # PostgreSQL hands back memoryview
        if len(blob) < _HEADER + 16 or not blob.startswith(MAGIC):
            raise DecryptionError("stored value is not genloop-encrypted data (bad header)")
        kid = blob[len(MAGIC) : len(MAGIC) + _KEY_ID_BYTES]
        aead = self._current().aeads.get(kid)
        if aead is None:
            raise DecryptionError(
                f"stored value was encrypted with key {kid.hex()}, which is not in the key "
                f"ring ({self.source}); add that key back to read it"
            )
        nonce = blob[len(MAGIC) + _KEY_ID_BYTES : _HEADER]
        try:
            return aead.decrypt(nonce, blob[_HEADER:], MAGIC).decode("utf-8")
        except InvalidTag:
            raise DecryptionError(
                "stored value failed authentication: corrupted or tampered with"
            ) from None

    def encrypt_optional(self, text: str | None) -> bytes | None:
        return None if text is None else self.encrypt(text)

    def decrypt_optional(self, blob: bytes | None) -> str | None:
        return None if blob is None else self.decrypt(blob)

    def sealed_with_primary(self, blob: bytes) -> bool:
        blob = bytes(blob)
        return blob[len(MAGIC) : len(MAGIC) + _KEY_ID_BYTES] == self._current().primary

    def pseudonym(self, value: str) -> str:
        """A stable, keyed stand-in for ``value`` (a user id) for the audit log.

        Without the key it cannot be reversed or tested against a list of guesses; with it,
        :meth:`pseudonyms` lets an operator check whether a given user id was erased.
        """
        return _pseudonym(self._current().pseudonym_keys[0], value)

    def pseudonyms(self, value: str) -> list[str]:
        """``value``'s pseudonym under every key of the ring (the audit log may hold any)."""
        return [_pseudonym(k, value) for k in self._current().pseudonym_keys]


def _pseudonym(key: bytes, value: str) -> str:
    return "u_" + hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:24]


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def encode_key(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode("ascii")


def decode_key(text: str, source: str) -> bytes:
    t = text.strip()
    raw: bytes | None = None
    if len(t) == 2 * KEY_BYTES:
        try:
            raw = bytes.fromhex(t)
        except ValueError:
            raw = None
    if raw is None:
        try:
            raw = base64.urlsafe_b64decode(t.encode("ascii") + b"=" * (-len(t) % 4))
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raw = None
    if raw is None or len(raw) != KEY_BYTES:
        raise ConfigError(
            f"{source} holds a key that is not {KEY_BYTES} bytes in URL-safe base64 or hex; "
            'make one with: python -c "import base64,os; '
            'print(base64.urlsafe_b64encode(os.urandom(32)).decode())"'
        )
    return raw


# ------------------------------------------------------------------------ the key file


def _root(ws: Workspace | Path) -> Path:
    return ws if isinstance(ws, Path) else ws.root


def key_file(ws: Workspace | Path) -> Path:
    return _root(ws) / KEY_FILE


def _file_stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _read_key_file(path: Path) -> list[bytes]:
    if os.name == "posix":
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{path} can be read by other users (mode {stat.S_IMODE(mode):o}); "
                f"run: chmod 600 {path}"
            )
    lines = [ln.strip() for ln in path.read_text(encoding="ascii").splitlines()]
    keys = [decode_key(ln, str(path)) for ln in lines if ln and not ln.startswith("#")]
    if not keys:
        raise ConfigError(f"{path} holds no key")
    return keys


def _write_key_file(path: Path, keys: list[bytes], *, replace: bool) -> bool:
    """Write ``keys`` (first: primary) with mode 0600, atomically.

    ``replace=False`` creates the file only if it is absent (False: another process made
    it first). The file appears whole or not at all.
    """
    text = (
        "# genloop encryption keys: the first encrypts, all decrypt. Keep this file secret;\n"
        "# losing it loses the encrypted prompts, responses and feedback.\n"
        + "".join(encode_key(k) + "\n" for k in keys)
    )
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if it exists: never overwrite another process's key
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def load_cipher(ws: Workspace | Path) -> Cipher:
    """The key ring from ``$GENLOOP_SECRET_KEY``, else ``<workspace>/secret.key`` (made on
    first use, mode 0600)."""
    env = os.environ.get(ENV_SECRET_KEY)
    if env is not None and env.strip():
        keys = [decode_key(part, f"${ENV_SECRET_KEY}") for part in env.split(",") if part.strip()]
        return Cipher(keys, f"${ENV_SECRET_KEY}")
    path = key_file(ws)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        if _write_key_file(path, [new_key()], replace=False):
            log.info("created encryption key file %s (mode 0600); back it up", path)
    return Cipher(_read_key_file(path), str(path), watch=path)


# ------------------------------------------------------------------------ rotation


@dataclass
class RotationResult:
    """What :func:`rotate_secret` did."""

    key_id: str  # the key that now encrypts
    reencrypted: int = 0  # rows rewritten
    unreadable: int = 0  # rows left as they were: their key is not in the ring
    pruned: list[str] = field(default_factory=list)  # old key ids removed from the key file
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "reencrypted": self.reencrypted,
            "unreadable": self.unreadable,
            "pruned": self.pruned,
            "source": self.source,
        }


def _batches(ws: Workspace, table: Any, columns: tuple[str, ...], size: int) -> Iterator[list[Any]]:
    from sqlalchemy import select

    last: Any = None
    while True:
        with ws.catalog.session() as s:
            query = select(table).order_by(table.id).limit(size)
            if last is not None:
                query = query.where(table.id > last)
            rows = list(s.scalars(query))
        if not rows:
            return
        last = rows[-1].id
        yield rows


def _reseal_secret_store(ws: Workspace, cipher: Cipher) -> int:
    """Seal every value of the workspace's secret store with the primary key; returns how
    many changed (a value no key of the ring opens is left as it is)."""
    import json

    path = _root(ws) / SECRET_STORE_FILE
    if not path.exists():
        return 0
    data: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
    changed = 0
    for name, sealed in data.items():
        try:
            blob = base64.b64decode(sealed, validate=True)
            if cipher.sealed_with_primary(blob):
                continue
            data[name] = base64.b64encode(cipher.encrypt(cipher.decrypt(blob))).decode("ascii")
        except (DecryptionError, binascii.Error):
            continue
        changed += 1
    if changed:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return changed


def rotate_secret(
    ws: Workspace, *, prune: bool = True, actor: str = "local", batch_size: int = 500
) -> RotationResult:
    """Encrypt every stored value under a new key and retire the old ones.

    With the key file: a new key is put first (the old ones kept after it), every value
    sealed with another key is re-encrypted, and then, with ``prune``, the old keys are
    removed from the file. With ``$GENLOOP_SECRET_KEY``: put the new key first in the
    variable, keep the old ones after it, run this, then drop the old ones from it.

    Servers may keep running: with the key file they load the new ring within
    :data:`RELOAD_INTERVAL_S`, and the re-encryption starts only after that (so a value a
    server sealed with the old key meanwhile is re-encrypted too). With the variable,
    restart them with the new value first.
    """
    from sqlalchemy import update

    from genloop.workspace import audit
    from genloop.workspace.tables import Feedback, RequestLog

    cipher = load_cipher(ws)
    from_env = cipher.source.startswith("$")
    if not from_env:
        path = key_file(ws)
        old = _read_key_file(path)
        _write_key_file(path, [new_key(), *old], replace=True)
        time.sleep(RELOAD_INTERVAL_S + 0.5)  # running servers switch to the new key first
        cipher = load_cipher(ws)
    result = RotationResult(key_id=cipher.primary_id, source=cipher.source)
    for table in (RequestLog, Feedback):
        columns = ENCRYPTED_COLUMNS[table.__tablename__]
        for rows in _batches(ws, table, columns, batch_size):
            changes: list[tuple[Any, dict[str, bytes]]] = []
            for row in rows:
                values: dict[str, bytes] = {}
                try:
                    for col in columns:
                        blob = getattr(row, col)
                        if blob is not None and not cipher.sealed_with_primary(blob):
                            values[col] = cipher.encrypt(cipher.decrypt(blob))
                except DecryptionError:
                    result.unreadable += 1
                    continue
                if values:
                    changes.append((row.id, values))
            if changes:
                with ws.catalog.session() as s:
                    for row_id, values in changes:
                        s.execute(update(table).where(table.id == row_id).values(**values))
                result.reencrypted += len(changes)
    result.reencrypted += _reseal_secret_store(ws, cipher)  # the named secrets (upstream keys)
    if prune and not from_env:
        path = key_file(ws)
        keys = _read_key_file(path)
        result.pruned = [key_id(k).hex() for k in keys[1:]]
        _write_key_file(path, keys[:1], replace=True)
    with ws.catalog.session() as s:
        audit.record(s, actor, "secret.rotate", f"key:{cipher.primary_id}", **result.to_dict())
    return result
