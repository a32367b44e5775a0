"""A lost worker's jobs restart within seconds; a job that kills its worker fails after 3 tries.

Real infrastructure only: a private redis-server and `unmask worker` processes killed with
SIGKILL (by pid). The visibility timeout is left at its default (600 s), so a job that restarts
within seconds was requeued because its worker's heartbeat expired (workers/recovery.py), not by
kombu's last-resort restore. The measured restart times are printed (`-s` shows them).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import redis
from redis_fixtures import WorkerProcess, redis_server, wait_until, worker_env  # noqa: F401
from tcp_proxy import TcpProxy

from unmask.engine.request import GenerationRequest
from unmask.models.sampler_params import SamplerParams
from unmask.settings import Settings
from unmask.workers import protocol, recovery
from unmask.workers.client import JobQueue
from unmask.workers.tasks import CRASH_EXIT_CODE, CRASH_MARKER_ENV

MODEL = "tiny"
RESTART_GOAL_S = 15.0  # issue 11: a killed worker's jobs restart within this
POISON = "POISON-PILL"


@pytest.fixture(scope="module")
def jobs(redis_server):  # noqa: F811
    with JobQueue(Settings(broker_url=redis_server.url, model_name=MODEL)) as q:
        yield q


class Fleet:
    """`unmask worker` processes for one test; `heartbeat_s` defaults to the Settings default."""

    def __init__(self, url: str, model_dir: Path, logdir: Path, jobs: JobQueue) -> None:
        self.env = worker_env(url, model_dir, max_batch=4)
        self.logdir = logdir
        self.jobs = jobs
        self.all: list[WorkerProcess] = []

    def start(self, concurrency: int = 2, wait: bool = True, **env: str) -> WorkerProcess:
        log = self.logdir / f"worker-{len(self.all)}.log"
        args = ("--model-name", MODEL, "--concurrency", str(concurrency))
        w = WorkerProcess({**self.env, **env}, log, args).start()
        self.all.append(w)
        if wait:
            w.wait_ready(lambda: self.jobs.live_workers(MODEL))
        return w

    def hostname(self, w: WorkerProcess) -> str:
        """The node name in the worker's heartbeat ("" while it has none)."""
        beats = self.jobs.live_workers(MODEL)
        return next((b["hostname"] for b in beats if b.get("pid") == w.pid), "")

    def stop(self) -> None:
        for w in self.all:
            w.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {w.log.name}\n{w.tail(25)}" for w in self.all)


@pytest.fixture
def fleet(redis_server, tiny_model_dir, tmp_path, jobs):  # noqa: F811
    f = Fleet(redis_server.url, tiny_model_dir, tmp_path, jobs)
    yield f
    f.stop()


def _req(i: int, prompt: str = "Job") -> GenerationRequest:
    params = SamplerParams(gen_length=96, steps=96, stop_at_eos=False, seed=i)
    return GenerationRequest("text", prompt=f"{prompt} {i}", model=MODEL, params=params)


def _claims(r: redis.Redis) -> dict[str, str]:
    """job id -> the worker that holds it."""
    raw = r.hgetall(protocol.inflight_key(MODEL)).values()
    return {c["job_id"]: c["worker"] for c in map(json.loads, raw)}


def _stepping(r: redis.Redis, job_id: str) -> bool:
    return r.xlen(protocol.events_key(job_id)) >= 3


def _in_engine(r: redis.Redis, job_id: str) -> bool:
    """Accepted by an Engine (batch items run without progress events: `accepted` is all)."""
    return r.xlen(protocol.events_key(job_id)) >= 1


def _restart_times(jobs: JobQueue, ids: list[str], t0: float, timeout: float) -> dict[str, float]:
    """Seconds from t0 until each job was handed to an Engine a second time."""
    seen: dict[str, float] = {}

    def restarted() -> bool:
        for j in ids:
            if j not in seen and jobs.status(j)["runs"] >= 2:
                seen[j] = time.monotonic() - t0
        return len(seen) == len(ids)

    wait_until(restarted, timeout, "the lost worker's jobs to run again", every=0.05)
    return seen


def _assert_restarted_in_time(jobs: JobQueue, fleet: Fleet, interrupted: list[str], t0: float,
                              what: str) -> None:  # fmt: skip
    """The lost worker's jobs ran again within RESTART_GOAL_S of t0 (the kill); prints the times."""
    times = _restart_times(jobs, interrupted, t0, timeout=60)
    print(f"\n{what}: its {len(times)} job(s) restarted after "
          f"{', '.join(f'{t:.1f}' for t in sorted(times.values()))} s")  # fmt: skip
    assert max(times.values()) < RESTART_GOAL_S, (times, fleet.logs())


def _check_exactly_once(jobs: JobQueue, ids: list[str], lost: list[str], worker: str) -> None:
    """Every job succeeded once; the `lost` ones ran twice and say why."""
    for j in ids:
        res = jobs.result(j, timeout=120)
        assert res.status == protocol.SUCCEEDED, res.error
        assert jobs.completions(j) == 1
        events = [e for _, e in jobs.events(j, timeout=10)]
        assert [e["type"] for e in events].count("final") == 1
        status = jobs.status(j)
        if j in lost:
            assert status["runs"] == 2, status
            assert status["note"] == f"requeued after worker {worker} was lost"
        else:
            assert status["runs"] == 1 and "note" not in status, status
    wait_until(lambda: jobs._redis.hlen(recovery.UNACKED) == 0, 60, "every message acknowledged")


# ---- the recovery script against a real Redis (no worker) -----------------------------------
def _unacked(r: redis.Redis, tag: str, job_id: str) -> None:
    """A delivered, unacknowledged message as kombu's Redis transport keeps it."""
    message = {"body": "", "headers": {"id": job_id}, "properties": {"delivery_tag": tag,
               "delivery_info": {"exchange": "", "routing_key": MODEL}}}  # fmt: skip
    r.hset(recovery.UNACKED, tag, json.dumps([message, "", protocol.queue_name(MODEL)]))
    r.zadd(recovery.UNACKED_INDEX, {tag: time.time()})


def test_two_sweepers_requeue_a_lost_workers_message_once_under_a_new_tag(jobs):
    r = jobs._redis
    dead = recovery.Owner(MODEL, "gone@host", "aaaa")
    live = recovery.Owner(MODEL, "here@host", "bbbb")
    r.set(protocol.worker_key(MODEL, "here@host"), json.dumps({"instance": "bbbb"}), ex=30)
    r.delete(protocol.queue_name(MODEL))
    for tag, owner, job in (("t-dead", dead, "job-a"), ("t-live", live, "job-b")):
        _unacked(r, tag, job)
        recovery.claim(r, owner, tag, job)
    sweepers = [recovery.Owner(MODEL, f"s{i}@host", f"s{i}") for i in range(4)]
    out: list[list[str]] = []
    threads = [threading.Thread(target=lambda s=s: out.append(recovery.sweep(r, s, 60)))
               for s in sweepers]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j for o in out for j in o) == ["job-a"]  # once, and never the live one's
    queued = [json.loads(m) for m in r.lrange(protocol.queue_name(MODEL), 0, -1)]
    assert len(queued) == 1 and queued[0]["headers"]["id"] == "job-a"
    assert queued[0]["properties"]["delivery_tag"] != "t-dead"
    assert queued[0]["properties"]["delivery_info"]["redelivered"] is True
    assert not r.hexists(recovery.UNACKED, "t-dead") and r.hexists(recovery.UNACKED, "t-live")
    assert r.get(protocol.lost_key("job-a")) == b"1"
    assert r.get(protocol.status_key("job-a")) == b"queued"
    assert jobs.status("job-a")["note"] == "requeued after worker gone@host was lost"
    assert set(_claims(r)) == {"job-b"}
    r.delete(protocol.queue_name(MODEL), recovery.UNACKED, recovery.UNACKED_INDEX,
             protocol.inflight_key(MODEL), protocol.worker_key(MODEL, "here@host"))  # fmt: skip


def test_a_claim_whose_message_was_acknowledged_is_dropped_and_nothing_queued(jobs):
    r = jobs._redis
    dead = recovery.Owner(MODEL, "gone@host", "cccc")
    r.delete(protocol.queue_name(MODEL))
    recovery.claim(r, dead, "t-acked", "job-c")  # no entry in `unacked`: acknowledged already
    assert recovery.sweep(r, recovery.Owner(MODEL, "me@host", "dddd"), 60) == []
    assert r.llen(protocol.queue_name(MODEL)) == 0 and _claims(r) == {}
    assert not r.exists(protocol.lost_key("job-c"))


def test_settle_requeues_a_message_given_back_while_redis_was_away_once_not_a_new_delivery(jobs):
    """A run gave its message back while kombu could not reach Redis (the message is still
    unacknowledged, the claim still there): settle() requeues it once, under a new tag, without
    counting a loss. A new delivery under the same tag (kombu restores under the old tag) is
    left alone."""
    r = jobs._redis
    me = recovery.Owner(MODEL, "me@host", "eeee")
    r.delete(protocol.queue_name(MODEL))
    _unacked(r, "t-back", "job-e")
    held = recovery.claim(r, me, "t-back", "job-e")
    assert held.index_score
    assert recovery.settle(r, me, "t-back", "job-e", held, requeue=True, ttl_s=60)
    assert not recovery.settle(r, me, "t-back", "job-e", held, requeue=True, ttl_s=60)
    queued = [json.loads(m) for m in r.lrange(protocol.queue_name(MODEL), 0, -1)]
    assert len(queued) == 1 and queued[0]["properties"]["delivery_tag"] != "t-back"
    assert not r.hexists(recovery.UNACKED, "t-back") and _claims(r) == {}
    assert not r.exists(protocol.lost_key("job-e"))
    assert jobs.status("job-e")["note"] == "requeued after Redis was unreachable"
    # the same tag delivered again (indexed anew, claimed by another worker or not yet)
    r.delete(protocol.queue_name(MODEL))
    _unacked(r, "t-again", "job-f")
    old = recovery.claim(r, me, "t-again", "job-f")
    time.sleep(0.01)
    _unacked(r, "t-again", "job-f")
    assert not recovery.settle(r, me, "t-again", "job-f", old, requeue=True, ttl_s=60)
    assert r.hexists(recovery.UNACKED, "t-again") and r.llen(protocol.queue_name(MODEL)) == 0
    # a run that ended (Celery acks it) but whose ack failed: the message is dropped
    _unacked(r, "t-done", "job-g")
    done = recovery.claim(r, me, "t-done", "job-g")
    assert recovery.settle(r, me, "t-done", "job-g", done, requeue=False, ttl_s=60)
    assert not r.hexists(recovery.UNACKED, "t-done") and r.llen(protocol.queue_name(MODEL)) == 0
    r.delete(recovery.UNACKED, recovery.UNACKED_INDEX, protocol.inflight_key(MODEL))


# ---- real workers, killed -------------------------------------------------------------------
def test_kill_9_a_worker_its_jobs_restart_on_the_survivor_within_15_s(fleet, jobs):
    survivor, victim = fleet.start(concurrency=4), fleet.start()  # room for the victim's jobs
    lost_worker = fleet.hostname(victim)
    r = jobs._redis
    ids = [jobs.submit(_req(i)) for i in range(4)]
    wait_until(lambda: any(_stepping(r, j) for j, w in _claims(r).items() if w == lost_worker),
               60, "a job of the victim to be stepping")  # fmt: skip
    mine = [j for j, w in _claims(r).items() if w == lost_worker]
    victim.kill9()
    t0 = time.monotonic()
    interrupted = [j for j in mine if not r.exists(protocol.result_key(j))]
    assert interrupted, "the victim's jobs finished before the kill: make them longer"
    _assert_restarted_in_time(jobs, fleet, interrupted, t0, "kill -9 of one of two workers")
    _check_exactly_once(jobs, ids, interrupted, lost_worker)
    assert survivor.proc.poll() is None


def test_kill_9_the_only_worker_a_new_one_restarts_its_jobs_within_15_s(fleet, jobs):
    first = fleet.start()
    lost_worker = fleet.hostname(first)
    r = jobs._redis
    ids = [jobs.submit(_req(10 + i)) for i in range(2)]
    wait_until(lambda: any(_stepping(r, j) for j in ids), 60, "a job to be stepping")
    first.kill9()
    t0 = time.monotonic()
    interrupted = [j for j in ids if not r.exists(protocol.result_key(j))]
    assert interrupted
    fleet.start()  # nobody else is left to requeue: the new worker sweeps once it is up
    started = time.monotonic() - t0
    _assert_restarted_in_time(jobs, fleet, interrupted, t0, "kill -9 of the only worker, a new "
                              f"one started ({started:.1f} s to its first heartbeat)")  # fmt: skip
    _check_exactly_once(jobs, ids, interrupted, lost_worker)


def test_a_worker_cut_off_from_redis_past_its_heartbeat_loses_its_jobs_to_a_peer_once(
    fleet,
    jobs,
    redis_server,  # noqa: F811
):
    """Not dead, only unreachable: a peer requeues its jobs all the same; when the link comes
    back its own runs are superseded (fencing), so each job still completes exactly once."""
    fast = {"UNMASK_HEARTBEAT_S": "0.5"}
    with TcpProxy("127.0.0.1", redis_server.port) as link:
        fleet.start(concurrency=4, **fast)
        cut_off = fleet.start(UNMASK_BROKER_URL=link.url(), **fast)
        lost_worker = fleet.hostname(cut_off)
        r = jobs._redis
        ids = [jobs.submit(_req(20 + i)) for i in range(4)]
        wait_until(lambda: any(_stepping(r, j) for j, w in _claims(r).items()
                               if w == lost_worker), 60, "a job of the victim to be stepping")  # fmt: skip
        mine = [j for j, w in _claims(r).items() if w == lost_worker]
        link.cut("blackhole")
        t0 = time.monotonic()
        moved = [j for j in mine if not r.exists(protocol.result_key(j))]
        times = _restart_times(jobs, moved, t0, timeout=60)
        print(f"\na worker cut off from Redis: its jobs restarted elsewhere after "
              f"{max(times.values()):.1f} s")  # fmt: skip
        link.restore()
        _check_exactly_once(jobs, ids, moved, lost_worker)
        assert cut_off.proc.poll() is None, "the cut-off worker did not survive"
        # back on the link, it beats again and serves jobs
        wait_until(lambda: fleet.hostname(cut_off), 30, "its heartbeat again")


def test_a_job_that_kills_its_worker_fails_after_3_deliveries(fleet, jobs):
    crash = {CRASH_MARKER_ENV: POISON, "UNMASK_HEARTBEAT_S": "0.5"}
    poison = jobs.submit(_req(0, POISON))
    deaths = []
    while not jobs._redis.exists(protocol.result_key(poison)):
        assert len(deaths) <= 3, f"the poison pill took down {len(deaths)} workers"
        w = fleet.start(wait=False, **crash)  # restarted as a supervisor would, each time
        wait_until(lambda w=w: w.proc.poll() is not None or jobs._redis.exists(
            protocol.result_key(poison)), 60, "the worker to crash or the job to fail")  # fmt: skip
        if w.proc.poll() is not None:
            deaths.append(w.proc.returncode)
    assert deaths == [CRASH_EXIT_CODE] * 3, fleet.logs()
    res = jobs.result(poison, timeout=5)
    assert res.status == protocol.FAILED
    assert res.error["type"] == "WorkerLost"
    assert res.error["message"] == "failed after 3 deliveries; the worker died each time"
    status = jobs.status(poison)
    assert status["runs"] == 3 and status["deliveries"] == 4, status
    assert jobs.completions(poison) == 1
    # the last worker survived it and serves the next job
    ok = jobs.submit(_req(1))
    assert jobs.result(ok, timeout=60).status == protocol.SUCCEEDED
    assert fleet.all[-1].proc.poll() is None


def test_a_batch_whose_worker_was_killed_says_why_its_items_wait(fleet, jobs, redis_server):  # noqa: F811
    """GetJob (and `unmask batch status`) name the lost worker while its items are requeued."""
    from unmask.client import Client
    from unmask.service.server import ServerThread

    survivor, victim = fleet.start(concurrency=4), fleet.start()
    lost_worker = fleet.hostname(victim)
    r = jobs._redis
    settings = Settings(broker_url=redis_server.url, model_name=MODEL)
    params = {"gen_length": 96, "steps": 96, "stop_at_eos": False}
    rows = [{"custom_id": f"b{i}", "body": {"prompt": f"Batch {i}", "params": params}}
            for i in range(4)]  # fmt: skip
    with ServerThread(settings) as srv, Client(f"127.0.0.1:{srv.port}", timeout=60) as client:
        batch = client.submit_batch(rows)
        wait_until(lambda: any(_in_engine(r, j) for j, w in _claims(r).items() if w == lost_worker),
                   60, "a batch item running on the victim")  # fmt: skip
        victim.kill9()
        note = wait_until(lambda: client.get_batch(batch.id).note, 30, "a note on the batch",
                          every=0.05)  # fmt: skip
        assert f"requeued after worker {lost_worker} was lost" in note, note
        assert note.split()[0].isdigit() and "item" in note  # "1 item requeued after …"
        done = client.wait_batch(batch.id, timeout=120)
        assert done.counts["succeeded"] == 4 and done.note == "", done
    assert survivor.proc.poll() is None


def test_a_publish_that_fails_leaves_no_queued_job_behind(redis_server):  # noqa: F811
    """Submit fails (here: a real Redis user that may not LPUSH onto the queue, as when Redis goes
    down between the calls): the caller gets UNAVAILABLE and no job id says "queued"."""
    r = redis.Redis.from_url(redis_server.url)
    r.execute_command("ACL", "SETUSER", "nopush", "on", ">pw", "~*", "&*", "+@all", "-lpush")
    url = f"redis://nopush:pw@127.0.0.1:{redis_server.port}/0"
    try:
        with JobQueue(Settings(broker_url=url, model_name=MODEL)) as q:
            req = _req(99)
            with pytest.raises(protocol.BrokerUnavailable):
                q.submit(req)
        assert not r.exists(protocol.status_key(req.job_id))
    finally:
        r.execute_command("ACL", "DELUSER", "nopush")
