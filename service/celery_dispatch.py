"""The celery dispatcher: jobs go to a model's Celery queue in Redis, workers run them.

The front end talks to the workers only through the queue (`unmask.workers.client.JobQueue`,
run in a small thread pool because it is synchronous) and reads progress from each job's Redis
Stream with an asyncio Redis client, so a waiting stream holds no thread. Torch-free.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any

import redis
import redis.asyncio as aioredis

from unmask.engine.request import GenerationRequest
from unmask.engine.result import GenerationResult
from unmask.errors import NotFound
from unmask.service.dispatch import MODALITIES, Dispatcher, ModelInfo
from unmask.settings import Settings
from unmask.workers.client import JobQueue
from unmask.workers.protocol import (
    KEY_PREFIX,
    BrokerUnavailable,
    decode_event,
    events_key,
    result_key,
)

log = logging.getLogger("unmask.service")

BLOCK_MS = 1000  # one XREAD waits at most this long before checking the result key
RESULT_FETCH_S = 5.0
CLOSE_WAIT_S = 8.0  # at close, how long queue calls under way may take to finish


class CeleryDispatcher(Dispatcher):
    kind = "celery"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.queue = JobQueue(settings)
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="unmask-queue")
        self._calls: set[Future] = set()  # queue calls under way, waited for at close()
        self._redis = aioredis.Redis.from_url(
            settings.broker_url,
            socket_connect_timeout=1.0,
            socket_timeout=2.0 + BLOCK_MS / 1000,
        )

    async def close(self) -> None:
        await self._redis.aclose()
        # wait for the queue calls under way (each should be bounded by Redis's socket
        # timeouts): one that finished after the event loop had stopped would leave its
        # awaiting task (a job's `cancel`, say) pending forever, destroyed with the loop. But
        # never for ever: a call stuck in Celery/kombu is logged and left behind.
        self._pool.shutdown(wait=False, cancel_futures=True)
        running = [f for f in self._calls if not f.done()]
        if running:
            _, stuck = await asyncio.to_thread(futures_wait, running, CLOSE_WAIT_S)
            if stuck:
                log.error("%d queue call(s) still running after %.0f s at shutdown",
                          len(stuck), CLOSE_WAIT_S)  # fmt: skip
        await asyncio.to_thread(self.queue.close)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A JobQueue call (synchronous, raises BrokerUnavailable itself) off the event loop."""
        future = self._pool.submit(functools.partial(fn, *args, **kwargs))
        self._calls.add(future)
        future.add_done_callback(self._calls.discard)
        return await asyncio.wrap_future(future)

    async def _r(self, coro: Any) -> Any:
        try:
            return await coro
        except (redis.RedisError, OSError) as exc:
            raise BrokerUnavailable(
                f"the job queue's Redis is unreachable ({exc})", field="broker_url"
            ) from exc

    async def check_model(self, name: str) -> None:
        if name == self.default_model:
            return
        if not await self._call(self.queue.live_workers, name):
            raise NotFound(
                f"unknown model {name!r}: no worker serves it (default {self.default_model!r})",
                field="model", value=name,
            )  # fmt: skip

    async def submit(self, request: GenerationRequest, *, events: bool = True) -> str:
        await self.check_model(request.model)
        return await self._call(self.queue.submit, request)

    async def _final(self, job_id: str) -> dict[str, Any]:
        return {
            "type": "final",
            "result": await self._call(self.queue.result, job_id, RESULT_FETCH_S),
        }

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        key, last = events_key(job_id), "0-0"
        while True:
            reply = await self._r(self._redis.xread({key: last}, count=256, block=BLOCK_MS))
            entries = reply[0][1] if reply else []
            for raw_id, fields in entries:
                last = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                event = decode_event(fields)
                if event.get("type") == "final":  # payloads are stored by reference
                    yield await self._final(job_id)
                    return
                yield event
            if not entries and await self._r(self._redis.exists(result_key(job_id))):
                yield await self._final(job_id)
                return

    async def cancel(self, job_id: str) -> None:
        await self._call(self.queue.cancel, job_id)

    async def poll(self, job_id: str) -> GenerationResult | None:
        if not await self._r(self._redis.exists(result_key(job_id))):
            return None
        return await self._call(self.queue.result, job_id, RESULT_FETCH_S)

    async def status(self, job_id: str) -> str:
        return (await self._call(self.queue.status, job_id))["status"]

    async def note(self, job_id: str) -> str:
        return (await self._call(self.queue.status, job_id)).get("note", "")

    async def _live(self) -> dict[str, list[dict[str, Any]]]:
        """model name -> its live workers' heartbeats."""
        keys = [k async for k in self._redis.scan_iter(f"{KEY_PREFIX}workers:*", count=500)]
        values = await self._redis.mget(keys) if keys else []
        live: dict[str, list[dict[str, Any]]] = {}
        for raw in values:
            if raw is None:
                continue
            beat = json.loads(raw)
            live.setdefault(str(beat.get("model_name") or ""), []).append(beat)
        return live

    async def models(self) -> list[ModelInfo]:
        live = await self._r(self._live())
        names = [self.default_model] + sorted(n for n in live if n != self.default_model)
        out = []
        for name in names:
            workers = live.get(name, [])
            details = next((w["details"] for w in workers if w.get("details")), {})
            queued = await self._call(self.queue.queue_length, name)
            out.append(
                ModelInfo(
                    name=name,
                    ready=bool(workers),
                    dispatcher=self.kind,
                    live_workers=len(workers),
                    queue_length=int(queued),
                    modalities=tuple(details.get("modalities") or MODALITIES),
                    extra={
                        "devices": sorted({str(w.get("device")) for w in workers}),
                        "details": details,
                    },
                )  # fmt: skip
            )
        return out
