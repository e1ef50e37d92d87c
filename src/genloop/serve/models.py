"""The models a server serves, and live swaps when an alias moves.

``genloop serve --model code-lm@production --model digits-gen`` serves each ref. A ref
resolves through the catalog *at request time*: every request (and a poll every second)
checks which version the ref names now. When that changed (``genloop models promote``,
a rollback, a new version of a bare ``NAME``), the new version is loaded beside the old
one and swapped in: requests from then on go to the new version, while requests already
running finish on the old one, which is unloaded once the last of them is done (or
aborted after ``swap_timeout_s``). A request that finds the new version loading waits for
it up to ``swap_wait_s`` (a native engine loads in seconds, so the next request after a
promotion gets the new weights); a slower start (a vLLM process takes a minute or two on
CPU) goes on in the background while requests keep going to the old version. Each
request holds a *lease* on the version it resolved to, from resolution to its last byte,
so no request ever finds its engine gone.

A request's ``model`` may name a served ref exactly (``code-lm@production``), its bare
name (``code-lm``: the first served ref of that name), or the concrete version it is
serving now (``code-lm@3``). Nothing else is loaded on demand.

A version is of one kind: ``text`` (a text engine: completions and chat), ``image`` (an
image generator: ``/v1/images/generations``), ``vision`` (a captioner: chat messages
with image parts) or ``embedding`` (an embedding engine, ``engine/embedder.py``:
``/v1/embeddings``). Image generators and captioners run one call at a time per version
(:meth:`LoadedModel.run_exclusive`): each call uses every core already.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from sqlalchemy import func, select

from genloop.errors import GenloopError, NotFoundError
from genloop.models.embeddings import EMBEDDING_FAMILIES
from genloop.models.family import IMAGE_FAMILIES
from genloop.serve.engine.protocol import ImageCaptioner, ImageGenerator, TextEngine
from genloop.serve.errors import ApiError
from genloop.workspace import registry
from genloop.workspace.refs import ModelRef, RefError, parse_ref
from genloop.workspace.registry import ModelVersionInfo
from genloop.workspace.tables import Alias, ModelVersion

if TYPE_CHECKING:
    from genloop.serve.engine.embedder import EmbeddingEngine
    from genloop.workspace import Workspace

log = logging.getLogger(__name__)

TEXT_FAMILIES = ("causal_lm", "seq2seq")
VISION_FAMILIES = ("captioning",)  # image → text, through the chat endpoint
SERVED_FAMILIES = TEXT_FAMILIES + IMAGE_FAMILIES + VISION_FAMILIES + EMBEDDING_FAMILIES
RETRY_FAILED_LOAD_S = 30.0  # a version that failed to load is not retried more often


TextLoader = Callable[[Path, ModelVersionInfo], TextEngine]
ImageLoader = Callable[[Path, ModelVersionInfo], ImageGenerator]
VisionLoader = Callable[[Path, ModelVersionInfo], ImageCaptioner]
EmbeddingLoader = Callable[[Path, ModelVersionInfo], "EmbeddingEngine"]
Kind = Literal["text", "image", "vision", "embedding"]
T = TypeVar("T")


class SwapObserver(Protocol):
    """What the manager tells monitoring (``genloop.monitor.metrics.ServingMetrics``)."""

    def model_loaded(self, model: str, version: int | None) -> None: ...

    def model_swapped(
        self, model: str, old_version: int | None, new_version: int | None
    ) -> None: ...

    def watch_engine(self, model: str, version: int | None, stats: Callable[[], Any]) -> None: ...

    def unwatch_engine(self, model: str, version: int | None) -> None: ...


@dataclass(eq=False)
class LoadedModel:
    """One loaded model version and the requests holding it."""

    served: str  # the served ref as configured, e.g. "code-lm@production"
    info: ModelVersionInfo
    kind: Kind
    engine: TextEngine | None = None
    images: ImageGenerator | None = None
    captioner: ImageCaptioner | None = None
    embeddings: EmbeddingEngine | None = None
    leases: int = 0
    retired: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # run_exclusive's
    waiting: int = 0  # requests queued for the lock

    @property
    def ref(self) -> str:
        """The concrete version, ``name@version``: what responses report as ``model``."""
        return self.info.ref

    def text_engine(self) -> TextEngine:
        if self.engine is None:
            raise self._wrong_kind()
        return self.engine

    def image_generator(self) -> ImageGenerator:
        if self.images is None:
            raise self._wrong_kind()
        return self.images

    def image_captioner(self) -> ImageCaptioner:
        if self.captioner is None:
            raise self._wrong_kind()
        return self.captioner

    def embedding_engine(self) -> EmbeddingEngine:
        if self.embeddings is None:
            raise self._wrong_kind()
        return self.embeddings

    def _wrong_kind(self) -> ApiError:
        use = {
            "text": "a text model; use /v1/completions or /v1/chat/completions",
            "image": "an image model; use /v1/images/generations",
            "vision": "a captioning model; send it images in /v1/chat/completions",
            "embedding": f"an embedding model ({self.info.family}), which does not generate "
            "text; use /v1/embeddings",
        }[self.kind]
        return ApiError(f"model {self.served} is {use}", param="model", code="wrong_model_kind")

    async def run_exclusive(
        self, call: Callable[[], T], *, max_queue: int, timeout_s: float, what: str
    ) -> T:
        """Run ``call`` in a thread, one at a time on this version, within ``timeout_s``:
        beyond ``max_queue`` waiting requests a 429, past the timeout a 504 (``what`` names
        the work in it). A call that times out keeps the lock until its thread is done, so
        the next one never runs beside it."""
        if self.lock.locked() and self.waiting >= max_queue:
            raise ApiError(
                f"model {self.ref} is busy ({self.waiting} requests waiting)",
                status=429,
                retry_after_s=5.0,
            )

        async def locked_run() -> T:
            self.waiting += 1
            try:
                await self.lock.acquire()
            finally:
                self.waiting -= 1
            task = asyncio.ensure_future(asyncio.to_thread(call))
            task.add_done_callback(lambda _: self.lock.release())
            return await asyncio.shield(task)

        try:
            return await asyncio.wait_for(locked_run(), timeout=timeout_s)
        except TimeoutError:
            raise ApiError(
                f"{what} took longer than {timeout_s:g}s", status=504, code="timeout"
            ) from None


@dataclass(eq=False)
class ServedModel:
    spec: str
    ref: ModelRef
    current: LoadedModel | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    failed: dict[int, float] = field(default_factory=dict)  # version id → when it failed
    error: str | None = None
    # the catalog lookup that requests arriving now will share (see ModelManager._version_id)
    next_lookup: asyncio.Future[int] | None = None
    last_lookup: asyncio.Task[None] | None = None
    loading: asyncio.Task[None] | None = None  # the swap to a new version, while it loads


class ModelManager:
    def __init__(
        self,
        ws: Workspace,
        refs: list[str],
        *,
        load_text: TextLoader,
        load_image: ImageLoader,
        load_vision: VisionLoader | None = None,
        load_embedding: EmbeddingLoader | None = None,
        observer: SwapObserver | None = None,
        poll_interval_s: float = 1.0,
        swap_timeout_s: float = 60.0,
        swap_wait_s: float = 10.0,
    ) -> None:
        self.ws = ws
        self.served = [ServedModel(spec=r, ref=parse_ref(r)) for r in dict.fromkeys(refs)]
        self.load_text = load_text
        self.load_image = load_image
        self.load_vision = load_vision
        self.load_embedding = load_embedding
        self.observer = observer
        self.poll_interval_s = poll_interval_s
        self.swap_timeout_s = swap_timeout_s
        self.swap_wait_s = swap_wait_s
        self.draining = False
        self._retired: set[LoadedModel] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    def check_refs(self) -> list[ModelVersionInfo]:
        """Resolve every ref now (a typo fails before the server starts)."""
        infos = []
        for served in self.served:
            info = registry.resolve(self.ws, served.ref)
            if info.family not in SERVED_FAMILIES:
                raise GenloopError(f"model {served.spec} has family {info.family}: cannot serve it")
            infos.append(info)
        return infos

    async def start(self) -> None:
        """Load every served ref, then watch the catalog for alias moves."""
        for served in self.served:
            try:
                await self._refresh(served)
            except Exception as exc:
                served.error = str(exc)
                log.error("could not load model %s: %s", served.spec, exc)
        self._started.set()
        self._watch = asyncio.create_task(self._watch_loop(), name="genloop-model-watch")

    async def wait_started(self) -> None:
        await self._started.wait()

    @property
    def ready(self) -> bool:
        return not self.draining and all(s.current is not None for s in self.served)

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting; let running requests finish, abort what is left at the deadline."""
        self.draining = True
        loaded = self._all_loaded()
        engines: list[Any] = [m.engine for m in loaded if m.engine is not None]
        engines += [m.embeddings for m in loaded if m.embeddings is not None]
        await asyncio.gather(*(e.drain(timeout_s) for e in engines), return_exceptions=True)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if not self.draining:
            await self.drain(0.0)
        for task in list(self._tasks):
            task.cancel()
        for served in self.served:
            if served.loading is not None:
                served.loading.cancel()
                with contextlib.suppress(BaseException):
                    await served.loading
            served.current = None
        self._retired.clear()
        gc.collect()

    def _all_loaded(self) -> list[LoadedModel]:
        current = [s.current for s in self.served if s.current is not None]
        return current + list(self._retired)

    # ------------------------------------------------------------------ requests

    def find(self, model: str) -> ServedModel:
        """The served ref a request's ``model`` names (404 listing the served ones)."""
        for served in self.served:
            if served.spec == model:
                return served
        try:
            ref = parse_ref(model)
        except RefError:
            ref = None
        if ref is not None:
            for served in self.served:
                if served.ref == ref:
                    return served
            for served in self.served:
                if served.ref.name != ref.name:
                    continue
                if ref.version is None and ref.alias is None:
                    return served
                current = served.current
                if ref.version is not None and current and current.info.version == ref.version:
                    return served
        known = ", ".join(s.spec for s in self.served) or "none"
        raise ApiError(
            f"model {model!r} is not served here (models: {known})",
            status=404,
            param="model",
            code="model_not_found",
        )

    def kind(self, model: str) -> Kind | None:
        """The kind of the version ``model`` names now (None: not served here, or not
        loaded yet): how a chat request is answered."""
        try:
            current = self.find(model).current
        except ApiError:
            return None
        return current.kind if current is not None else None

    def has(self, model: str) -> bool:
        try:
            self.find(model)
        except ApiError:
            return False
        return True

    @contextlib.asynccontextmanager
    async def use(self, model: str) -> AsyncIterator[LoadedModel]:
        """Hold the version ``model`` names now for the duration of the block."""
        loaded = await self.acquire(model)
        try:
            yield loaded
        finally:
            self.release(loaded)

    async def acquire(self, model: str) -> LoadedModel:
        """Resolve ``model`` now and take a lease on its version (release it after)."""
        if self.draining:
            raise ApiError("server is shutting down", status=503, retry_after_s=5.0)
        served = self.find(model)
        await self._refresh(served, on_request=True)
        loaded = served.current
        if loaded is None:
            await self._started.wait()
            loaded = served.current
        if loaded is None:
            detail = f": {served.error}" if served.error else ""
            raise ApiError(
                f"model {served.spec} is not loaded{detail}", status=503, retry_after_s=5.0
            )
        loaded.leases += 1
        return loaded

    def release(self, loaded: LoadedModel) -> None:
        loaded.leases -= 1
        if loaded.leases <= 0 and loaded.retired:
            loaded.idle.set()

    def listing(self) -> list[dict[str, Any]]:
        out = []
        for served in self.served:
            cur = served.current
            if cur is None:
                continue
            out.append(
                {
                    "id": served.spec,
                    "object": "model",
                    "created": int(cur.info.created_at.timestamp()),
                    "owned_by": "genloop",
                    "ref": cur.ref,
                    "version": cur.info.version,
                    "family": cur.info.family,
                    "kind": cur.kind,
                }
            )
        return out

    # ------------------------------------------------------------------ swaps

    def _current_id(self, ref: ModelRef) -> int:
        """The id of the version ``ref`` names now: one small query (runs per request)."""
        with self.ws.catalog.session() as s:
            if ref.alias is not None:
                query = select(Alias.model_version_id).where(
                    Alias.name == ref.name, Alias.alias == ref.alias
                )
            elif ref.version is not None:
                query = select(ModelVersion.id).where(
                    ModelVersion.name == ref.name, ModelVersion.version == ref.version
                )
            else:
                newest = (
                    select(func.max(ModelVersion.version))
                    .where(ModelVersion.name == ref.name)
                    .scalar_subquery()
                )
                query = select(ModelVersion.id).where(
                    ModelVersion.name == ref.name, ModelVersion.version == newest
                )
            found = s.scalar(query)
        if found is None:
            raise NotFoundError(f"model ref {ref} names no version in the catalog")
        return int(found)

    async def _version_id(self, served: ServedModel) -> int:
        """The version id ``served.ref`` names now, from a lookup that started after this
        call: requests arriving together share one query (one thread hop and one catalog
        round trip for many requests, which under load is GIL time the engine thread
        would otherwise wait for), and none is answered by a lookup that may predate a
        promotion it must see.

        While a lookup runs, callers join the next one, which starts when it is done.
        """
        future = served.next_lookup
        if future is None:
            future = served.next_lookup = asyncio.get_running_loop().create_future()
            previous = served.last_lookup

            async def lookup(done: asyncio.Future[int]) -> None:
                try:
                    if previous is not None:
                        await asyncio.wait([previous])
                    served.next_lookup = None  # callers from now on need a later lookup
                    done.set_result(await asyncio.to_thread(self._current_id, served.ref))
                except Exception as exc:
                    done.set_exception(exc)
                    done.exception()  # marked retrieved: the callers (if any left) raise it
                finally:  # cancelled (the loop is closing): nobody may wait on it forever
                    if served.next_lookup is done:
                        served.next_lookup = None
                    if not done.done():
                        done.cancel()

            served.last_lookup = asyncio.create_task(lookup(future))
        return await asyncio.shield(future)

    async def _refresh(self, served: ServedModel, *, on_request: bool = False) -> None:
        """Load the version ``served`` names now, if it is not the one loaded. With nothing
        loaded yet, wait for it (its error is raised); a request waits for a swap at most
        ``swap_wait_s`` and is then served by the version still loaded; the poll waits."""
        cur = served.current
        try:
            version_id = await self._version_id(served)
        except Exception as exc:
            if cur is None:
                raise
            # The catalog is unreachable or the alias was removed: keep serving.
            if not on_request:
                log.warning("cannot resolve %s (%s); still serving %s", served.spec, exc, cur.ref)
            return
        if cur is not None and cur.info.id == version_id:
            return
        failed_at = served.failed.get(version_id)
        if cur is not None and failed_at and time.monotonic() - failed_at < RETRY_FAILED_LOAD_S:
            return
        task = served.loading
        if task is None or task.done():
            task = served.loading = asyncio.create_task(
                self._swap(served, version_id), name=f"load-{served.spec}"
            )
        if cur is None:
            await asyncio.shield(task)  # a cancelled request does not cancel the load
        else:
            await asyncio.wait({task}, timeout=self.swap_wait_s if on_request else None)

    async def _swap(self, served: ServedModel, version_id: int) -> None:
        """Load the version the ref names and swap it in; with a version already serving, a
        failure is logged (and shown in the status) and that version goes on serving."""
        async with served.lock:
            cur = served.current
            if cur is not None and cur.info.id == version_id:
                return  # loaded while this task waited for the lock
            try:
                info = await asyncio.to_thread(registry.resolve, self.ws, served.ref)
                new = await self._load(served.spec, info)
            except Exception as exc:
                served.failed[version_id] = time.monotonic()
                served.error = str(exc) if isinstance(exc, GenloopError) else type(exc).__name__
                if cur is None:
                    raise
                log.error(
                    "could not load the new version of %s (%s); still serving %s",
                    served.spec,
                    exc,
                    cur.ref,
                )
                return
            if self.draining:  # shutting down while it loaded: it never serves
                if new.engine is not None:
                    await new.engine.drain(0.0)
                if new.embeddings is not None:
                    await new.embeddings.drain(0.0)
                return
            served.current = new
            served.error = None
            if self.observer is not None:
                if new.engine is not None:
                    self.observer.watch_engine(info.name, info.version, new.engine.stats)
                if new.embeddings is not None:
                    self.observer.watch_engine(info.name, info.version, new.embeddings.stats)
                if cur is None:
                    self.observer.model_loaded(info.name, info.version)
                else:
                    self.observer.model_swapped(info.name, cur.info.version, info.version)
            if cur is not None:
                log.info("%s now serves %s (was %s)", served.spec, new.ref, cur.ref)
                self._retire(cur)
            else:
                log.info("%s loaded: %s", served.spec, new.ref)

    async def _load(self, spec: str, info: ModelVersionInfo) -> LoadedModel:
        kind = model_kind(info.family)
        if kind is None:
            raise GenloopError(f"model {info.ref} has family {info.family}: cannot serve it")
        load_vision, load_embedding = self.load_vision, self.load_embedding
        if kind == "vision" and load_vision is None:
            raise GenloopError(
                f"model {info.ref} is a captioning model: this server has no loader for it"
            )
        if kind == "embedding" and load_embedding is None:
            raise GenloopError(
                f"model {info.ref} is an embedding model: this server has no loader for it"
            )

        def load() -> LoadedModel:
            path = registry.artifact_path(self.ws, info.ref)  # manifest verified
            if kind == "image":
                return LoadedModel(spec, info, kind, images=self.load_image(path, info))
            if kind == "vision":
                assert load_vision is not None
                return LoadedModel(spec, info, kind, captioner=load_vision(path, info))
            if kind == "embedding":
                assert load_embedding is not None
                return LoadedModel(spec, info, kind, embeddings=load_embedding(path, info))
            return LoadedModel(spec, info, kind, engine=self.load_text(path, info))

        loaded = await asyncio.to_thread(load)
        if loaded.engine is not None:
            await loaded.engine.start()
        if loaded.embeddings is not None:
            await loaded.embeddings.start()
        return loaded

    def _retire(self, old: LoadedModel) -> None:
        old.retired = True
        if old.leases <= 0:
            old.idle.set()
        self._retired.add(old)
        task = asyncio.create_task(self._unload_when_idle(old), name=f"unload-{old.ref}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unload_when_idle(self, old: LoadedModel) -> None:
        try:
            await asyncio.wait_for(old.idle.wait(), timeout=self.swap_timeout_s)
        except TimeoutError:
            log.warning(
                "%s: aborting %d requests still running after the swap", old.ref, old.leases
            )
        if old.engine is not None:
            await old.engine.drain(0.0)
        if old.embeddings is not None:
            await old.embeddings.drain(0.0)
        self._retired.discard(old)
        watched = old.engine is not None or old.embeddings is not None
        if self.observer is not None and watched:
            self.observer.unwatch_engine(old.info.name, old.info.version)
        old.engine = None
        old.images = None
        old.captioner = None
        old.embeddings = None
        gc.collect()
        _empty_cuda_cache()
        log.info("unloaded %s", old.ref)

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            if self.draining:
                return
            for served in self.served:
                try:
                    await self._refresh(served)
                except Exception as exc:
                    if served.error != str(exc):
                        log.warning("cannot load %s: %s", served.spec, exc)
                    served.error = str(exc)


def model_kind(family: str) -> Kind | None:
    """What serves a family's versions (None: it is not served)."""
    if family in TEXT_FAMILIES:
        return "text"
    if family in IMAGE_FAMILIES:
        return "image"
    if family in VISION_FAMILIES:
        return "vision"
    if family in EMBEDDING_FAMILIES:
        return "embedding"
    return None


def _empty_cuda_cache() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
