"""Requeue a lost worker's jobs within seconds, instead of after the visibility timeout.

Kombu's Redis transport keeps every delivered, unacknowledged message in the `unacked` hash
(delivery tag -> [message, exchange, routing key]) and puts it back on its queue once it is
older than the visibility timeout: minutes, since that must exceed the hard time limit. The
other workers know much sooner that a worker is gone: its heartbeat key has expired.

- claim: a worker that receives a message records the delivery tag as its own in the model's
  in-flight hash (tag -> job id, worker name, process instance); release: the task ended.
- sweep: every worker, after each heartbeat, looks for claims whose worker's heartbeat has
  expired (or now belongs to another process of the same name) and moves each such message
  from `unacked` back to the head of its queue, under a new delivery tag, in one Lua script
  that also counts the loss (`lost`, which caps deliveries, see tasks.py) and notes the reason
  in the job's status. A worker started after a crash sweeps too, so one worker at a time is
  enough.
- settle: a run that ends while Redis is away cannot hand its message back. Celery's reject
  (requeue) or ack goes through kombu, which only logs "Couldn't reject" when Redis does not
  answer, and the message then waits in `unacked` for the visibility timeout (seen with
  `docker compose restart redis`: items done 10 minutes late). So the worker remembers such
  deliveries, and once a heartbeat reaches Redis again it settles each of them: drops its
  claim and moves its message back to the head of the queue under a new tag (the run gave it
  back) or drops it (the run ended and Celery acked it). A claim that failed while Redis was
  away is written then too.

Nothing runs twice: the script moves a message only while it is still unacknowledged under the
same tag and payload (and, when settling, the same delivery: its score in kombu's index), so
kombu's own restore and a second sweeper cannot both requeue it; and the rerun is a new
delivery, so a "lost" worker that was only cut off from Redis is superseded by the fencing in
tasks.py. The new tag keeps such a worker's late ack from removing the new delivery's record.
The visibility timeout stays the last resort (a message received by a worker that died before
it could claim it, or that died before Redis came back to settle what it could not).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from unmask.workers.protocol import (
    QUEUED,
    inflight_key,
    lost_key,
    note_key,
    queue_name,
    result_key,
    status_key,
    worker_key,
)

log = logging.getLogger("unmask.workers")

UNACKED, UNACKED_INDEX = "unacked", "unacked_index"  # kombu's Redis transport key names

# KEYS: inflight, unacked, unacked index, queue, lost, status, result, note.
# ARGV: tag, claim JSON, payload in unacked, payload to queue ("": drop it, the job ended), ttl,
# note, queued status, mode, the tag's score in the unacked index when it was claimed ("": not
# known). Mode "lost": the claim must still be there, unchanged, and the requeue counts as a
# loss. Mode "own": the claim may be gone too (never written, or removed), nothing is counted.
# The score tells deliveries apart: kombu restores a message under the same tag, and a new
# delivery of it is indexed anew. Returns 1 (moved or dropped) or 0 (the claim or the tag is
# another delivery's now, or the message is no longer unacknowledged under this tag with this
# payload).
_REQUEUE_LUA = """
local claim = redis.call('HGET', KEYS[1], ARGV[1])
if claim ~= ARGV[2] and (ARGV[8] == 'lost' or claim) then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
if ARGV[9] ~= '' and redis.call('ZSCORE', KEYS[3], ARGV[1]) ~= ARGV[9] then
  return 0
end
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[3] then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if ARGV[4] == '' then
  return 1
end
redis.call('RPUSH', KEYS[4], ARGV[4])
if ARGV[8] == 'lost' then
  redis.call('INCR', KEYS[5])
  redis.call('EXPIRE', KEYS[5], ARGV[5])
end
redis.call('SET', KEYS[8], ARGV[6], 'EX', ARGV[5])
if redis.call('EXISTS', KEYS[7]) == 0 then
  redis.call('SET', KEYS[6], ARGV[7], 'EX', ARGV[5])
end
return 1
"""

# KEYS: inflight, unacked index. ARGV: tag, claim JSON. Returns the tag's score in the index.
_CLAIM_LUA = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return redis.call('ZSCORE', KEYS[2], ARGV[1])
"""

# KEYS: inflight. ARGV: tag, claim JSON, tag, claim JSON, ... Deletes each claim that is unchanged.
_RELEASE_LUA = """
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return 0
"""


@dataclass(frozen=True)
class Owner:
    """One worker process: its Celery node name and a random id that no restart repeats (a
    container restarted with the same hostname and pid is still a new process)."""

    model_name: str
    hostname: str
    instance: str


@dataclass(frozen=True)
class Claim:
    job_id: str
    worker: str
    instance: str
    since: float

    def to_json(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Claim | None:
        try:
            d = json.loads(raw)
            return cls(str(d["job_id"]), str(d["worker"]), str(d["instance"]), float(d["since"]))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class Held:
    """A claim as written, and which delivery under its tag it is (settle() checks both)."""

    record: str
    index_score: str  # the tag's score in kombu's unacked index ("" if it had none)


def claim(r: redis.Redis, me: Owner, tag: str, job_id: str) -> Held:
    """Record `tag` as held by `me`."""
    record = Claim(job_id, me.hostname, me.instance, time.time()).to_json()
    keys = [inflight_key(me.model_name), UNACKED_INDEX]
    score = r.register_script(_CLAIM_LUA)(keys=keys, args=[tag, record])
    return Held(record, score.decode() if isinstance(score, bytes) else "")


def release(r: redis.Redis, me: Owner, claims: dict[str, Held]) -> None:
    """Drop these claims (tag -> claim as written), each only while it is still the same: kombu
    restores a message under the same tag, and a new delivery of it has its own claim."""
    if claims:
        args = [x for tag, held in claims.items() for x in (tag, held.record)]
        r.register_script(_RELEASE_LUA)(keys=[inflight_key(me.model_name)], args=args)


def settle(
    r: redis.Redis, me: Owner, tag: str, job_id: str, held: Held | None, requeue: bool, ttl_s: int
) -> bool:
    """Finish what this process could not write while Redis was away, for a delivery whose run
    has ended: drop its claim (`held`, None if it was never written) and, if its message is
    still unacknowledged under `tag` (kombu's reject or ack failed), put it back on the queue
    under a new tag (`requeue`: the run gave it back) or drop it (the run ended, Celery acked).
    Returns True when it moved or dropped the message. Safe against kombu's own restore: only
    a message still unacknowledged under the same tag and payload moves, once."""
    payload = r.hget(UNACKED, tag)
    note = "requeued after Redis was unreachable"
    queued = (_retagged(payload) if requeue else "") if payload else ""
    keys = [inflight_key(me.model_name), UNACKED, UNACKED_INDEX, queue_name(me.model_name),
            lost_key(job_id), status_key(job_id), result_key(job_id), note_key(job_id)]  # fmt: skip
    args = [tag, held.record if held else "", payload or b"", queued, ttl_s, note, QUEUED, "own",
            held.index_score if held else ""]  # fmt: skip
    moved = bool(r.register_script(_REQUEUE_LUA)(keys=keys, args=args))
    if moved and requeue:
        log.warning("job %s %s: its worker could not give it back then", job_id, note)
    elif moved:
        log.info("job %s: its message acknowledged after Redis was unreachable", job_id)
    return moved


def sweep(r: redis.Redis, me: Owner, ttl_s: int) -> list[str]:
    """Requeue every message that a lost worker of this model had claimed; returns their job
    ids. `ttl_s`: how long the loss count and the note are kept."""
    claims = {}
    for tag, raw in r.hgetall(inflight_key(me.model_name)).items():
        c = Claim.from_json(raw)
        if c is not None:
            claims[tag.decode()] = (raw, c)
    lost = _lost_workers(r, me, {(c.worker, c.instance) for _, c in claims.values()})
    requeued = []
    for tag, (raw, c) in claims.items():
        if (c.worker, c.instance) in lost and _requeue(r, me, tag, raw, c, ttl_s):
            requeued.append(c.job_id)
    return requeued


def _lost_workers(r: redis.Redis, me: Owner, owners: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """The (worker, instance) pairs whose heartbeat is gone or names another instance."""
    others = sorted(o for o in owners if o[1] != me.instance)
    if not others:
        return set()
    beats = r.mget([worker_key(me.model_name, worker) for worker, _ in others])
    return {o for o, beat in zip(others, beats, strict=True) if _instance(beat) != o[1]}


def _instance(beat: bytes | None) -> str | None:
    try:
        return json.loads(beat).get("instance") if beat is not None else None
    except ValueError:
        return None


def _requeue(r: redis.Redis, me: Owner, tag: str, raw: bytes, c: Claim, ttl_s: int) -> bool:
    payload = r.hget(UNACKED, tag)
    note = f"requeued after worker {c.worker} was lost"
    j = c.job_id
    keys = [inflight_key(me.model_name), UNACKED, UNACKED_INDEX, queue_name(me.model_name),
            lost_key(j), status_key(j), result_key(j), note_key(j)]  # fmt: skip
    args = [tag, raw, payload or b"", _retagged(payload) if payload else "", ttl_s, note, QUEUED,
            "lost", ""]  # fmt: skip
    requeued = bool(r.register_script(_REQUEUE_LUA)(keys=keys, args=args))
    if requeued:
        log.warning("job %s %s (no heartbeat)", c.job_id, note)
    return requeued


def _retagged(payload: bytes) -> str:
    """The queued form of an unacknowledged message, under a new delivery tag and marked
    redelivered (as kombu marks the messages it restores)."""
    message: dict[str, Any] = json.loads(payload)[0]
    properties = message.setdefault("properties", {})
    properties["delivery_tag"] = str(uuid.uuid4())
    properties.setdefault("delivery_info", {})["redelivered"] = True
    message.setdefault("headers", {})["redelivered"] = True
    return json.dumps(message)
