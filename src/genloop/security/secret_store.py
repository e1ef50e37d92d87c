"""Named secrets kept in the workspace, encrypted: the keys genloop sends to other servers.

``serve.upstreams`` entries name one with ``api_key_secret: NAME`` (or an environment
variable with ``api_key_env``). The store is ``<workspace>/secrets.json``, mode 0600: a
JSON object of name → the value sealed with the workspace cipher
(:mod:`genloop.security.crypto`, AES-256-GCM, base64), so a copy of the file without the
key reveals nothing but the names and lengths. :func:`genloop.security.crypto.rotate_secret`
reseals it with the other stored values. Values are never logged, listed or audited;
set and delete are audited by name.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets as _random  # the standard library's
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from genloop.errors import ConfigError, NotFoundError
from genloop.security.crypto import SECRET_STORE_FILE, Cipher, DecryptionError, load_cipher

if TYPE_CHECKING:
    from genloop.workspace.workspace import Workspace

STORE_FILE = SECRET_STORE_FILE
MAX_VALUE_CHARS = 8192
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def store_file(ws: Workspace) -> Path:
    return ws.root / STORE_FILE


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"secret name {name!r} is not valid: use 1 to 64 letters, digits, '_', '.', '-'"
        )
    return name


def _read(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    if os.name == "posix":
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{path} can be read by other users (mode {stat.S_IMODE(mode):o}); "
                f"run: chmod 600 {path}"
            )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{path} is not a genloop secret store ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ConfigError(f"{path} is not a genloop secret store (expected name → sealed value)")
    return data


def _write(path: Path, data: dict[str, str]) -> None:
    """Replace the store atomically, mode 0600."""
    tmp = path.with_name(f".{path.name}.{_random.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dict(sorted(data.items())), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def set_secret(ws: Workspace, name: str, value: str, *, actor: str = "local") -> bool:
    """Store ``value`` under ``name`` (replacing one); True when it replaced one."""
    from genloop.workspace import audit

    check_name(name)
    value = value.strip()
    if not value:
        raise ConfigError(f"the value of secret {name!r} is empty")
    if len(value) > MAX_VALUE_CHARS or "\n" in value or "\x00" in value:
        raise ConfigError(
            f"the value of secret {name!r} must be one line of at most {MAX_VALUE_CHARS} characters"
        )
    path = store_file(ws)
    data = _read(path)
    replaced = name in data
    data[name] = base64.b64encode(load_cipher(ws).encrypt(value)).decode("ascii")
    _write(path, data)
    with ws.catalog.session() as s:
        audit.record(s, actor, "secret.set", f"secret:{name}", replaced=replaced)
    return replaced


def get_secret(ws: Workspace, name: str, cipher: Cipher | None = None) -> str:
    """The value stored under ``name``."""
    data = _read(store_file(ws))
    if check_name(name) not in data:
        known = ", ".join(sorted(data)) or "none"
        raise NotFoundError(
            f"no secret {name!r} in {store_file(ws)} (stored: {known}); "
            f"add it with: genloop secrets set {name}"
        )
    try:
        return (cipher or load_cipher(ws)).decrypt(base64.b64decode(data[name], validate=True))
    except (DecryptionError, binascii.Error):
        raise ConfigError(
            f"secret {name!r} cannot be decrypted with this workspace's key; set it again "
            f"with: genloop secrets set {name}"
        ) from None


def list_secrets(ws: Workspace) -> list[str]:
    """The names stored (never the values)."""
    return sorted(_read(store_file(ws)))


def delete_secret(ws: Workspace, name: str, *, actor: str = "local") -> None:
    from genloop.workspace import audit

    path = store_file(ws)
    data = _read(path)
    if check_name(name) not in data:
        raise NotFoundError(f"no secret {name!r} (stored: {', '.join(sorted(data)) or 'none'})")
    del data[name]
    _write(path, data)
    with ws.catalog.session() as s:
        audit.record(s, actor, "secret.delete", f"secret:{name}")
