"""Batch jobs: a record (status, counts, per-item results keyed by custom_id), one job per item
through the dispatcher, and a finalize step once every item has ended.

Two stores behind one interface:

- `MemoryBatchStore` (local dispatcher): this process's memory; batches are lost on restart.
- `RedisBatchStore` (celery dispatcher): everything in Redis, so any front end can report on,
  continue and finish a batch another one accepted.

    unmask:batch:<id>             hash: id status model idempotency_key created_at finished_at
                                  total succeeded failed cancelled cancel_requested
    unmask:batch:<id>:items       hash: custom_id -> item (JSON {custom_id, request}) until done
    unmask:batch:<id>:pending     list: custom_ids not handed out yet
    unmask:batch:<id>:inflight    hash: custom_id -> {job_id, modality, taken_at} (JSON)
    unmask:batch:<id>:results     hash: custom_id -> item result (JSON)
    unmask:batch:<id>:order       list: custom_ids in the order they finished
    unmask:batch:<id>:lock        the runner's lease (one front end advances a batch at a time)
    unmask:batch:idem:<key>       idempotency key -> "<batch id> <content hash>"
    unmask:batches                zset: batch id by creation time (ListJobs)
    unmask:batches:active         set: batches still running

A `BatchRunner` (an asyncio task in every front end) advances the active batches: it collects
finished items, hands out at most `batch_window` items per batch at a time (so a large batch
neither floods the model's queue nor trips its back-pressure), cancels on request (finished
items are kept; items not started become "cancelled") and finalizes. An item handed out whose
job never reached the queue (a front end died in between) is submitted again after
RECOVER_AFTER_S. A finished batch expires after `result_ttl_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from unmask.engine.request import GenerationRequest
from unmask.engine.result import FAILED, GenerationResult
from unmask.errors import Cancelled, UnmaskError, error_dict
from unmask.service.dispatch import Dispatcher

log = logging.getLogger("unmask.service.batches")

RUNNING, CANCELLING, COMPLETED, CANCELLED = "running", "cancelling", "completed", "cancelled"
RECOVER_AFTER_S = 30.0  # an item in flight this long with no job behind it is submitted again
FINISHED = (COMPLETED, CANCELLED)
BUCKET = {"succeeded": "succeeded", "failed": "failed", "deadline_exceeded": "failed",
          "cancelled": "cancelled"}  # fmt: skip


def new_batch_id() -> str:
    return "batch_" + uuid.uuid4().hex


class IdempotencyConflict(UnmaskError):
    """An idempotency key sent again with different items or options: not a retry of the batch
    the key names, so that batch is not returned."""

    code = "FAILED_PRECONDITION"


def _idempotency_conflict(key: str, batch_id: str) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"idempotency key {key!r} was used for batch {batch_id} with different items or options;"
        " send the same batch again to get it, or use a new key",
        field="idempotency_key",
        value=key,
    )


_PER_SUBMISSION = ("job_id", "deadline")  # new on every submission: not what the batch asks for


def batch_content_hash(record: dict[str, Any], items: list[dict[str, Any]]) -> str:
    """sha256 of what a batch asks for (its model and its items, in order) as canonical JSON:
    the same batch sent again hashes the same, whatever job ids its requests were given."""

    def content(item: dict[str, Any]) -> dict[str, Any]:
        req = item.get("request")
        if isinstance(req, dict):
            req = {k: v for k, v in req.items() if k not in _PER_SUBMISSION}
        return {**item, "request": req}

    doc = {"model": record.get("model") or "", "items": [content(i) for i in items]}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def item_result(custom_id: str, modality: str, result: GenerationResult) -> dict[str, Any]:
    """A finished job's result → the stored (JSON) item result."""
    return {"custom_id": custom_id, "modality": modality, **result.to_wire()}


def cancelled_item(custom_id: str, modality: str) -> dict[str, Any]:
    cancelled = error_dict(Cancelled("the batch was cancelled"))
    return item_result(custom_id, modality, GenerationResult("", CANCELLED, error=cancelled))


class BatchStore(ABC):
    @abstractmethod
    async def create(self, record: dict[str, Any], items: list[dict[str, Any]]) -> tuple[str, bool]:
        """Store a new batch; with an idempotency key already used, (existing id, False), or
        IdempotencyConflict if that batch's content (`batch_content_hash`) differs."""

    @abstractmethod
    async def get(self, batch_id: str) -> dict[str, Any] | None: ...

    @abstractmethod
    async def list(self, offset: int, limit: int) -> list[dict[str, Any]]:
        """Newest first."""

    @abstractmethod
    async def active(self) -> list[str]: ...

    @abstractmethod
    async def take(self, batch_id: str, n: int) -> list[dict[str, Any]]:
        """Move up to n pending items to in-flight (recorded under their request's job id)."""

    @abstractmethod
    async def put_back(self, batch_id: str, item: dict[str, Any]) -> None:
        """An item that could not be submitted returns to the front of the pending list."""

    @abstractmethod
    async def inflight(self, batch_id: str) -> dict[str, dict[str, Any]]:
        """custom_id -> {"job_id", "modality", "taken_at"} of items handed out, not finished."""

    @abstractmethod
    async def item(self, batch_id: str, custom_id: str) -> dict[str, Any] | None:
        """An unfinished item ({"custom_id", "request"})."""

    @abstractmethod
    async def pending_count(self, batch_id: str) -> int: ...

    @abstractmethod
    async def record(self, batch_id: str, result: dict[str, Any]) -> bool:
        """Store an item's result once (False if it had one) and count it."""

    @abstractmethod
    async def results(self, batch_id: str, offset: int, limit: int) -> list[dict[str, Any]]:
        """Item results in the order they finished."""

    @abstractmethod
    async def request_cancel(self, batch_id: str) -> None: ...

    @abstractmethod
    async def finalize(self, batch_id: str, status: str) -> None: ...

    def lease(self, batch_id: str) -> contextlib.AbstractAsyncContextManager[bool]:
        """Held while one runner advances the batch; yields False when another holds it."""
        return _always()


@contextlib.asynccontextmanager
async def _always() -> AsyncIterator[bool]:
    yield True


def _flight(item: dict[str, Any], now: float) -> dict[str, Any]:
    request = item["request"]
    return {"job_id": request["job_id"], "modality": request["modality"], "taken_at": now}


def _counts(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: int(rec.get(k) or 0) for k in ("total", "succeeded", "failed", "cancelled")}


# ---- in memory ---------------------------------------------------------------------------


class MemoryBatchStore(BatchStore):
    """Batches in this process (the local dispatcher's): gone when the server stops."""

    def __init__(self) -> None:
        self._recs: dict[str, dict[str, Any]] = {}
        self._pending: dict[str, list[dict[str, Any]]] = {}
        self._inflight: dict[str, dict[str, dict[str, Any]]] = {}
        self._results: dict[str, dict[str, dict[str, Any]]] = {}
        self._order: dict[str, list[str]] = {}
        self._idem: dict[str, tuple[str, str]] = {}  # key -> (batch id, content hash)
        self._items: dict[str, dict[str, dict[str, Any]]] = {}

    async def create(self, record, items):
        key = record.get("idempotency_key")
        digest = batch_content_hash(record, items) if key else ""
        if key and key in self._idem and self._idem[key][0] in self._recs:
            existing, existing_digest = self._idem[key]
            if existing_digest != digest:
                raise _idempotency_conflict(key, existing)
            return existing, False
        bid = record["id"]
        self._recs[bid] = {**record, "status": RUNNING, "finished_at": 0.0, "total": len(items),
                           "succeeded": 0, "failed": 0, "cancelled": 0,
                           "cancel_requested": False}  # fmt: skip
        self._pending[bid] = list(items)
        self._inflight[bid], self._results[bid], self._order[bid] = {}, {}, []
        self._items[bid] = {i["custom_id"]: i for i in items}
        if key:
            self._idem[key] = (bid, digest)
        return bid, True

    async def get(self, batch_id):
        rec = self._recs.get(batch_id)
        return None if rec is None else {**rec, "counts": _counts(rec)}

    async def list(self, offset, limit):
        recs = sorted(self._recs.values(), key=lambda r: r["created_at"], reverse=True)
        return [{**r, "counts": _counts(r)} for r in recs[offset : offset + limit]]

    async def active(self):
        return [b for b, r in self._recs.items() if r["status"] not in FINISHED]

    async def take(self, batch_id, n):
        pending = self._pending[batch_id]
        taken, self._pending[batch_id] = pending[:n], pending[n:]
        for item in taken:
            self._inflight[batch_id][item["custom_id"]] = _flight(item, time.time())
        return taken

    async def put_back(self, batch_id, item):
        self._inflight[batch_id].pop(item["custom_id"], None)
        self._pending[batch_id].insert(0, item)

    async def inflight(self, batch_id):
        return dict(self._inflight.get(batch_id, {}))

    async def item(self, batch_id, custom_id):
        return self._items.get(batch_id, {}).get(custom_id)

    async def pending_count(self, batch_id):
        return len(self._pending.get(batch_id, []))

    async def record(self, batch_id, result):
        cid = result["custom_id"]
        self._inflight[batch_id].pop(cid, None)
        self._items[batch_id].pop(cid, None)
        if cid in self._results[batch_id]:
            return False
        self._results[batch_id][cid] = result
        self._order[batch_id].append(cid)
        self._recs[batch_id][BUCKET.get(result["status"], "failed")] += 1
        return True

    async def results(self, batch_id, offset, limit):
        ids = self._order.get(batch_id, [])[offset : offset + limit]
        return [self._results[batch_id][c] for c in ids]

    async def request_cancel(self, batch_id):
        rec = self._recs[batch_id]
        rec["cancel_requested"] = True
        if rec["status"] == RUNNING:
            rec["status"] = CANCELLING

    async def finalize(self, batch_id, status):
        self._recs[batch_id].update(status=status, finished_at=time.time())


# ---- Redis -------------------------------------------------------------------------------

# KEYS: pending, inflight, items. ARGV: n, now.
_TAKE_LUA = """
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local cid = redis.call('LPOP', KEYS[1])
  if not cid then break end
  local v = redis.call('HGET', KEYS[3], cid)
  if v then
    local request = cjson.decode(v)['request']
    local flight = {job_id = request['job_id'], modality = request['modality'],
                    taken_at = tonumber(ARGV[2])}
    redis.call('HSET', KEYS[2], cid, cjson.encode(flight))
    table.insert(out, v)
  end
end
return out
"""

# KEYS: results, inflight, order, batch, items. ARGV: custom_id, result JSON, count field.
_RECORD_LUA = """
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('RPUSH', KEYS[3], ARGV[1])
  redis.call('HINCRBY', KEYS[4], ARGV[3], 1)
  return 1
end
return 0
"""

_CANCEL_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
if redis.call('HGET', KEYS[1], 'status') == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelling')
end
return 1
"""

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisBatchStore(BatchStore):
    """Batches in Redis (the celery dispatcher's): shared by every front end."""

    PREFIX = "unmask:batch"

    def __init__(self, redis_client: Any, ttl_s: int, lease_s: float = 10.0) -> None:
        self.r = redis_client
        self.ttl_s = ttl_s
        self.lease_s = lease_s
        self._take = self.r.register_script(_TAKE_LUA)
        self._record = self.r.register_script(_RECORD_LUA)
        self._cancel = self.r.register_script(_CANCEL_LUA)
        self._release = self.r.register_script(_RELEASE_LUA)

    def _k(self, batch_id: str, suffix: str = "") -> str:
        return f"{self.PREFIX}:{batch_id}" + (f":{suffix}" if suffix else "")

    def _keys(self, batch_id: str) -> list[str]:
        return [self._k(batch_id)] + [
            self._k(batch_id, s) for s in ("items", "pending", "inflight", "results", "order")
        ]

    async def create(self, record, items):
        # Write the batch first, then claim the idempotency key: whoever wins the SET NX has
        # its record in place already, so a concurrent resubmission never sees a half batch.
        bid = record["id"]
        key = record.get("idempotency_key")
        fields = {
            "id": bid, "status": RUNNING, "model": record["model"],
            "idempotency_key": key or "", "created_at": record["created_at"], "finished_at": 0,
            "total": len(items), "succeeded": 0, "failed": 0, "cancelled": 0,
            "cancel_requested": 0,
        }  # fmt: skip
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self._k(bid), mapping=fields)
        for start in range(0, len(items), 1000):
            chunk = items[start : start + 1000]
            pipe.hset(self._k(bid, "items"), mapping={i["custom_id"]: json.dumps(i) for i in chunk})
            pipe.rpush(self._k(bid, "pending"), *(i["custom_id"] for i in chunk))
        await pipe.execute()
        if key:
            # the key's value holds the batch id and its content hash, claimed in one SET NX
            idem, digest = self._idem(key), batch_content_hash(record, items)
            while not await self.r.set(idem, f"{bid} {digest}", nx=True):
                value = (await self.r.get(idem) or b"").decode()
                existing, _, existing_digest = value.partition(" ")
                if existing and await self.r.exists(self._k(existing)):
                    await self.r.delete(*self._keys(bid))
                    # no hash: a key stored before hashes were (the batch is returned as before)
                    if existing_digest and existing_digest != digest:
                        raise _idempotency_conflict(key, existing)
                    return existing, False
                await self.r.delete(idem)  # the batch it named has expired
        pipe = self.r.pipeline(transaction=True)
        pipe.zadd(f"{self.PREFIX}es", {bid: record["created_at"]})
        pipe.sadd(f"{self.PREFIX}es:active", bid)
        await pipe.execute()
        return bid, True

    def _idem(self, key: str) -> str:
        return f"{self.PREFIX}:idem:{key}"

    def _decode(self, raw: dict[bytes, bytes]) -> dict[str, Any]:
        rec: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
        rec["created_at"] = float(rec.get("created_at") or 0)
        rec["finished_at"] = float(rec.get("finished_at") or 0)
        rec["cancel_requested"] = rec.get("cancel_requested") == "1"
        rec["counts"] = _counts(rec)
        return rec

    async def get(self, batch_id):
        raw = await self.r.hgetall(self._k(batch_id))
        return self._decode(raw) if raw else None

    async def list(self, offset, limit):
        ids = await self.r.zrevrange(f"{self.PREFIX}es", offset, offset + limit - 1)
        out = []
        for raw_id in ids:
            rec = await self.get(raw_id.decode())
            if rec is None:  # expired: forget it
                await self.r.zrem(f"{self.PREFIX}es", raw_id)
            else:
                out.append(rec)
        return out

    async def active(self):
        return sorted(m.decode() for m in await self.r.smembers(f"{self.PREFIX}es:active"))

    async def take(self, batch_id, n):
        keys = [self._k(batch_id, s) for s in ("pending", "inflight", "items")]
        raw = await self._take(keys=keys, args=[n, time.time()])
        return [json.loads(v) for v in raw]

    async def put_back(self, batch_id, item):
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(self._k(batch_id, "inflight"), item["custom_id"])
        pipe.lpush(self._k(batch_id, "pending"), item["custom_id"])
        await pipe.execute()

    async def inflight(self, batch_id):
        raw = await self.r.hgetall(self._k(batch_id, "inflight"))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    async def item(self, batch_id, custom_id):
        raw = await self.r.hget(self._k(batch_id, "items"), custom_id)
        return json.loads(raw) if raw is not None else None

    async def pending_count(self, batch_id):
        return int(await self.r.llen(self._k(batch_id, "pending")))

    async def record(self, batch_id, result):
        keys = [self._k(batch_id, "results"), self._k(batch_id, "inflight"),
                self._k(batch_id, "order"), self._k(batch_id), self._k(batch_id, "items")]  # fmt: skip
        bucket = BUCKET.get(result["status"], "failed")
        done = await self._record(keys=keys, args=[result["custom_id"], json.dumps(result), bucket])
        return bool(done)

    async def results(self, batch_id, offset, limit):
        ids = await self.r.lrange(self._k(batch_id, "order"), offset, offset + limit - 1)
        if not ids:
            return []
        raw = await self.r.hmget(self._k(batch_id, "results"), ids)
        return [json.loads(v) for v in raw if v is not None]

    async def request_cancel(self, batch_id):
        await self._cancel(keys=[self._k(batch_id)])

    async def finalize(self, batch_id, status):
        key = (await self.r.hget(self._k(batch_id), "idempotency_key") or b"").decode()
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self._k(batch_id), mapping={"status": status, "finished_at": time.time()})
        pipe.srem(f"{self.PREFIX}es:active", batch_id)
        for k in self._keys(batch_id) + ([self._idem(key)] if key else []):
            pipe.expire(k, self.ttl_s)  # the key lives as long as the batch it names
        await pipe.execute()

    @contextlib.asynccontextmanager
    async def lease(self, batch_id: str) -> AsyncIterator[bool]:
        key, token = self._k(batch_id, "lock"), uuid.uuid4().hex
        got = await self.r.set(key, token, nx=True, px=int(self.lease_s * 1000))
        try:
            yield bool(got)
        finally:
            if got:
                await self._release(keys=[key], args=[token])


# ---- the runner --------------------------------------------------------------------------


class BatchRunner:
    """Advances every active batch a little, every `interval_s` (or sooner when kicked)."""

    def __init__(
        self, store: BatchStore, dispatcher: Dispatcher, window: int, interval_s: float = 0.2
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.window = window
        self.interval_s = interval_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._checked: dict[str, float] = {}  # job id -> when it was last checked for loss

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="unmask-batch-runner")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def kick(self) -> None:
        self._wake.set()

    def _stale(self, job_id: str, taken_at: float, now: float) -> bool:
        """In flight for over RECOVER_AFTER_S and not checked for that long."""
        if now - max(taken_at, self._checked.get(job_id, 0.0)) < RECOVER_AFTER_S:
            return False
        self._checked[job_id] = now
        if len(self._checked) > 100_000:
            self._checked.clear()
        return True

    async def _loop(self) -> None:
        while True:
            try:
                for batch_id in await self.store.active():
                    async with self.store.lease(batch_id) as mine:
                        if mine:
                            await self.advance(batch_id)
            except asyncio.CancelledError:
                raise
            except UnmaskError as exc:  # e.g. Redis down: health reports it; try again later
                log.warning("batch runner: %s", exc)
            except Exception:
                log.exception("batch runner failed; retrying")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)

    async def advance(self, batch_id: str) -> None:
        rec = await self.store.get(batch_id)
        if rec is None or rec["status"] in FINISHED:
            return
        cancel = rec["cancel_requested"]
        now = time.time()
        for custom_id, flight in (await self.store.inflight(batch_id)).items():
            job_id = flight["job_id"]
            result = await self.dispatcher.poll(job_id)
            if result is not None:
                await self.store.record(
                    batch_id, item_result(custom_id, flight["modality"], result)
                )
            elif cancel:
                await self.dispatcher.cancel(job_id)
            elif self._stale(job_id, float(flight.get("taken_at") or now), now):
                # handed out but never submitted: the front end doing it died in between
                item = await self.store.item(batch_id, custom_id)
                if item is not None and await self.dispatcher.status(job_id) == "unknown":
                    log.warning("batch %s: item %s was never submitted; submitting it now",
                                batch_id, custom_id)  # fmt: skip
                    await self._hand_out(batch_id, [item])
        if cancel:
            for item in await self.store.take(batch_id, 1 << 30):
                request = item["request"]
                await self.store.record(
                    batch_id, cancelled_item(item["custom_id"], request.get("modality", ""))
                )
        else:
            room = self.window - len(await self.store.inflight(batch_id))
            if room > 0:
                await self._hand_out(batch_id, await self.store.take(batch_id, room))
        if not await self.store.inflight(batch_id) and not await self.store.pending_count(batch_id):
            await self.store.finalize(batch_id, CANCELLED if cancel else COMPLETED)
            log.info("batch %s %s", batch_id, CANCELLED if cancel else COMPLETED)

    async def _hand_out(self, batch_id: str, items: list[dict[str, Any]]) -> None:
        for i, item in enumerate(items):
            try:
                request = GenerationRequest.from_dict(item["request"])
                # nobody watches a batch item: no step events through the Engine and Redis
                request = dataclasses.replace(request, progress=False)
                await self.dispatcher.submit(request, events=False)
            except UnmaskError as exc:
                if exc.code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):  # back-pressure: later
                    for rest in reversed(items[i:]):
                        await self.store.put_back(batch_id, rest)
                    return
                failed = GenerationResult(item["request"].get("job_id", ""), FAILED,
                                          error=error_dict(exc))  # fmt: skip
                await self.store.record(
                    batch_id,
                    item_result(item["custom_id"], item["request"].get("modality", ""), failed),
                )
