"""The serving engine: continuous batching over a slot KV cache.

``load_engine`` builds one from a model directory (``loader.py`` picks the backend; the
server's ``loader.load_text_engine`` may pick a managed vLLM process, ``vllm.py``, instead);
``engine.py`` explains how it runs; ``protocol.py`` is the interface the HTTP layer and the
batch runner use, ``types.py`` the data that crosses it. Importing this package stays light
(no torch), so ``protocol`` and ``types`` can be used without a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from genloop.config import ServeConfig
    from genloop.serve.engine.engine import Engine
    from genloop.serve.engine.types import EngineObserver


def load_engine(
    model_dir: Path,
    *,
    model_name: str,
    model_version: int | None,
    cfg: ServeConfig,
    observer: EngineObserver | None = None,
) -> Engine:
    """An engine for the text model in ``model_dir`` (not started: ``await engine.start()``)."""
    from genloop.serve.engine.loader import load_engine as load

    return load(
        model_dir, model_name=model_name, model_version=model_version, cfg=cfg, observer=observer
    )


__all__ = ["load_engine"]
