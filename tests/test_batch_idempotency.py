"""An idempotency key names one batch: sent again with the same content it gives that batch,
with different content it is refused (IdempotencyConflict: FAILED_PRECONDITION, naming the key).

Both stores, the Redis one on a real private redis-server (no mocks), and once end to end over
gRPC on loopback with the local dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from redis_fixtures import redis_server  # noqa: F401 - a fixture

from unmask.engine.request import GenerationRequest
from unmask.models.sampler_params import SamplerParams
from unmask.service.batches import (
    IdempotencyConflict,
    MemoryBatchStore,
    RedisBatchStore,
    batch_content_hash,
    new_batch_id,
)

KEY = "nightly-2024-06-01"


def record(key: str = KEY, model: str = "m") -> dict:
    return {"id": new_batch_id(), "model": model, "created_at": time.time(),
            "idempotency_key": key}  # fmt: skip


def items(*prompts: str, custom_ids: list[str] | None = None, **params) -> list[dict]:
    """Batch items as SubmitBatch stores them; every call gives the requests new job ids."""
    p = SamplerParams(**{"gen_length": 8, "steps": 2, **params})
    ids = custom_ids or [f"item-{i}" for i in range(len(prompts))]
    return [{"custom_id": cid, "request": GenerationRequest("text", prompt=pr, model="m",
                                                            params=p).to_dict()}
            for cid, pr in zip(ids, prompts, strict=True)]  # fmt: skip


# what may differ between two submissions with one key: each is a different batch
DIFFERENT = {
    "a prompt": (record(), items("a", "c")),
    "one more item": (record(), items("a", "b", "c")),
    "one item fewer": (record(), items("a")),
    "a sampler option": (record(), items("a", "b", seed=7)),
    "a custom id": (record(), items("a", "b", custom_ids=["item-0", "other"])),
    "the order": (record(), items("b", "a", custom_ids=["item-1", "item-0"])),
    "the batch's model": (record(model="other"), items("a", "b")),
}


@contextlib.asynccontextmanager
async def open_store(kind: str, url: str) -> AsyncIterator:
    if kind == "memory":
        yield MemoryBatchStore()
        return
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    try:
        yield RedisBatchStore(client, ttl_s=60)
    finally:
        await client.aclose()


@pytest.fixture(params=["memory", "redis"])
def store_kind(request) -> str:
    return request.param


@pytest.fixture
def url(store_kind, request) -> str:
    if store_kind == "memory":
        return ""
    return request.getfixturevalue("redis_server").url


def run(coro):
    return asyncio.run(coro)


def test_the_content_hash_ignores_job_ids_and_deadlines():
    a, b = items("a", "b"), items("a", "b")
    assert a[0]["request"]["job_id"] != b[0]["request"]["job_id"]
    b[0]["request"]["deadline"] = time.time() + 60
    assert batch_content_hash(record(), a) == batch_content_hash(record(), b)
    assert batch_content_hash(record(), a) != batch_content_hash(record(), items("a", "x"))


def test_the_same_key_and_content_give_the_same_batch(store_kind, url):
    async def scenario():
        async with open_store(store_kind, url) as store:
            first, created = await store.create(record(), items("a", "b"))
            again, created_again = await store.create(record(), items("a", "b"))
            other, _ = await store.create(record(key="other-key"), items("a", "b"))
            listed = [r["id"] for r in await store.list(0, 10)]
            return first, created, again, created_again, other, listed

    first, created, again, created_again, other, listed = run(scenario())
    assert created and not created_again
    assert again == first != other
    assert sorted(listed) == sorted([first, other])  # the resubmission left no second batch


@pytest.mark.parametrize("what", DIFFERENT)
def test_the_same_key_with_different_content_is_refused(store_kind, url, what):
    rec, changed = DIFFERENT[what]

    async def scenario():
        async with open_store(store_kind, url) as store:
            first, _ = await store.create(record(), items("a", "b"))
            with pytest.raises(IdempotencyConflict) as err:
                await store.create({**rec, "id": new_batch_id()}, changed)
            kept = await store.get(first)
            listed = [r["id"] for r in await store.list(0, 10)]
            again, created = await store.create(record(), items("a", "b"))  # still its batch
            return err.value, first, kept, listed, again, created

    exc, first, kept, listed, again, created = run(scenario())
    assert exc.code == "FAILED_PRECONDITION" and exc.field == "idempotency_key"
    assert KEY in str(exc) and first in str(exc)
    assert kept is not None and kept["counts"]["total"] == 2  # the first batch is untouched
    assert listed == [first]  # and the refused one left nothing behind
    assert again == first and not created


def test_redis_a_key_whose_batch_expired_can_name_a_new_batch(redis_server):  # noqa: F811
    async def scenario():
        async with open_store("redis", redis_server.url) as store:
            first, _ = await store.create(record(), items("a", "b"))
            await store.r.delete(*store._keys(first))  # what the batch's TTL does
            return first, await store.create(record(), items("something", "else"))

    first, (second, created) = run(scenario())
    assert created and second != first


def test_redis_a_key_stored_without_a_hash_still_gives_its_batch(redis_server):  # noqa: F811
    """A key written by a server from before content hashes: the old behaviour."""

    async def scenario():
        async with open_store("redis", redis_server.url) as store:
            first, _ = await store.create(record(), items("a", "b"))
            await store.r.set(store._idem(KEY), first)
            return first, await store.create(record(), items("x"))

    first, (again, created) = run(scenario())
    assert again == first and not created


def test_redis_concurrent_submissions_with_one_key_make_one_batch(redis_server):  # noqa: F811
    """Front ends racing on one key: one batch wins; the same content gets it, different
    content is refused, whichever order the claims land in."""

    async def scenario():
        async with open_store("redis", redis_server.url) as store:
            same = await asyncio.gather(
                *(store.create(record(), items("a", "b")) for _ in range(4))
            )
            await store.r.flushdb()
            mixed = await asyncio.gather(
                *(store.create(record(), items(p)) for p in ("a", "b", "c", "d")),
                return_exceptions=True,
            )
            listed = [r["id"] for r in await store.list(0, 10)]
            return same, mixed, listed

    same, mixed, listed = run(scenario())
    assert len({bid for bid, _ in same}) == 1 and sum(created for _, created in same) == 1
    won = [m for m in mixed if not isinstance(m, BaseException)]
    refused = [m for m in mixed if isinstance(m, IdempotencyConflict)]
    assert len(won) == 1 and won[0][1] and len(refused) == 3
    assert listed == [won[0][0]]


# ---- end to end: gRPC on loopback, the local dispatcher ------------------------------------


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    from unmask.client import Client
    from unmask.models.generation import Generator
    from unmask.service.server import ServerThread
    from unmask.settings import Settings

    settings = Settings(max_batch_items=4, batch_window=2)
    with ServerThread(settings, generator=Generator.load(tiny_model_dir)) as srv:
        with Client(f"127.0.0.1:{srv.port}") as c:
            yield c


def _rows(*prompts: str) -> list[dict]:
    return [{"custom_id": f"item-{i}", "body": {"prompt": p, "params": {"gen_length": 8,
                                                                        "steps": 2}}}
            for i, p in enumerate(prompts)]  # fmt: skip


@pytest.mark.usefixtures("one_thread")
def test_grpc_reusing_a_key_for_other_rows_is_failed_precondition(client):
    from unmask.client import ServiceError

    first = client.submit_batch(_rows("a", "b"), idempotency_key="e2e-key-1")
    assert client.submit_batch(_rows("a", "b"), idempotency_key="e2e-key-1").id == first.id
    with pytest.raises(ServiceError) as err:
        client.submit_batch(_rows("a", "changed"), idempotency_key="e2e-key-1")
    assert err.value.code == "FAILED_PRECONDITION", err.value
    assert "e2e-key-1" in err.value.message and err.value.field == "idempotency_key"
    assert client.wait_batch(first.id, timeout=120).counts["total"] == 2
    assert [b.id for b in client.list_batches()[0]] == [first.id]
