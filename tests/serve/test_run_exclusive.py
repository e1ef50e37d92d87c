"""``LoadedModel.run_exclusive``: the image generators' and captioners' one-at-a-time
runs, with a bounded queue (429) and a timeout (504) that never lets two calls overlap."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime

import pytest

from genloop.serve.errors import ApiError
from genloop.serve.models import LoadedModel
from genloop.workspace.registry import ModelVersionInfo


def loaded() -> LoadedModel:
    info = ModelVersionInfo(
        id=1, name="m", version=1, family="captioning", artifact="", created_at=datetime.now(UTC)
    )
    return LoadedModel("m", info, "vision")


def test_one_call_at_a_time_a_bounded_queue_and_a_timeout() -> None:
    model = loaded()
    release = threading.Event()
    running: list[str] = []
    overlaps: list[str] = []

    def work(name: str, wait: bool = False) -> str:
        if running:
            overlaps.append(name)
        running.append(name)
        try:
            if wait:
                release.wait(10)
            else:
                time.sleep(0.02)
        finally:
            running.remove(name)
        return name

    async def main() -> None:
        run = model.run_exclusive
        first = asyncio.create_task(
            run(lambda: work("first", wait=True), max_queue=1, timeout_s=0.3, what="captioning")
        )
        await asyncio.sleep(0.05)
        second = asyncio.create_task(
            run(lambda: work("second"), max_queue=1, timeout_s=10, what="captioning")
        )
        await asyncio.sleep(0.05)
        with pytest.raises(ApiError) as busy:  # one running, one waiting: the queue is full
            await run(lambda: work("third"), max_queue=1, timeout_s=10, what="captioning")
        assert busy.value.http_status == 429 and busy.value.retry_after_s
        with pytest.raises(ApiError) as late:
            await first
        assert late.value.http_status == 504 and "captioning took longer" in str(late.value)
        await asyncio.sleep(0.1)
        assert not second.done()  # the timed-out call's thread still holds the model
        release.set()
        assert await second == "second"
        assert await run(lambda: work("fourth"), max_queue=0, timeout_s=10, what="x") == "fourth"

    asyncio.run(main())
    assert overlaps == []
    assert not model.lock.locked() and model.waiting == 0
