"""The Celery application, configured from `Settings`: Redis broker and result store, JSON only.

Torch-free: the client builds the same app to publish (`send_task` by name) without importing
the task module. Every ack, retry and pool setting lives here (the task decorator and the
`unmask worker` command line repeat none of them). Delivery guarantees:

- `task_acks_late`: a message is acknowledged only after its task returned, so a worker killed
  mid-job leaves it unacknowledged in Redis (kombu's `unacked` hash);
- a lost worker (heartbeat expired: three missed `heartbeat_s`) has its unacknowledged jobs
  requeued within seconds by any live worker of its model (recovery.py), fenced so that nothing
  runs twice (tasks.py);
- a run that ends while Redis is away cannot hand its message back through kombu (its reject
  or ack fails, and kombu only logs it): the worker settles it once Redis answers again
  (recovery.py), so it does not wait for the visibility timeout;
- last resort, the Redis transport puts an unacknowledged message back on its queue once it is
  older than the visibility timeout. That timeout is longer than the hard time limit (Settings
  checks it), so a job that is still running is never handed to a second worker; restore
  sweeps run every quarter of the timeout (kombu's default, once every 100 s, is far too slow);
- delivery caps: a job whose worker died on `max_deliveries` deliveries fails instead of taking
  down the next worker; a job that lost Redis mid-run goes back to the queue up to
  REDIS_LOSS_DELIVERIES deliveries (a network blip is not the job's fault);
- prefetch multiplier 1: a worker reserves at most `concurrency` jobs, so jobs wait in the shared
  queue (where any worker can take them and `LLEN` measures back-pressure), not in one process.

Transport: kombu's Redis transport, with one guard (RedisTransport): a channel that outlives its
connection raises a connection error instead of kombu 5.7.0's AttributeError, which killed the
worker when Redis restarted.

Pool: `threads`, `worker_concurrency` threads feeding one Engine (tasks.py says why). What that
pool enforces: the number of task threads, and (through the consumer, not the pool) the prefetch
limit. What it ignores: `task_time_limit` / `task_soft_time_limit` (prefork enforces both, gevent
the hard one), `worker_max_tasks_per_child` / `worker_max_memory_per_child` (prefork
only), and `task_reject_on_worker_lost` (it concerns a dead prefork child; here the worker is
the process). So no time limit is handed to Celery: tasks.py enforces the soft limit between
Engine steps and the hard limit with a watchdog on the Engine's events.

The job id *is* the Celery task id. Results, events and payloads are written by the task itself
to our own keys (see protocol.py); the Celery result backend only receives a small summary dict.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import redis
from celery import Celery
from kombu.transport import redis as kombu_redis

from unmask.settings import Settings
from unmask.workers.protocol import queue_name

REDIS_LOSS_DELIVERIES = 10  # deliveries of a job that keeps losing Redis mid-run, then it fails


class _Channel(kombu_redis.Channel):
    """kombu 5.7.0's Redis channel, except when its connection is gone. A channel can outlive
    its connection (Celery closes the connection when Redis goes away, and closes a channel
    later): closing it restores its unacknowledged messages through a new pool built from
    `connection.client`, which is None by then, so kombu raises AttributeError ('NoneType'
    object has no attribute 'hostname'), Celery's clean-up does not catch it, and the worker
    process dies ("Unrecoverable error"). Raise the connection error this stands for instead:
    Celery ignores those while it reconnects, and the messages stay in `unacked` (the worker
    settles what it could not hand back: recovery.py)."""

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection is None or self.connection.client is None:
            raise redis.ConnectionError("this channel's broker connection is closed")
        return super()._connparams(asynchronous=asynchronous)


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with _Channel."""

    Channel = _Channel


def celery_config(settings: Settings, *, client: bool = False) -> dict[str, Any]:
    visibility = int(settings.visibility_timeout_s)
    transport: dict[str, Any] = {
        "visibility_timeout": visibility,
        "unacked_restore_interval": max(1, visibility // 4),
        "unacked_restore_throttle": 1,
    }
    if client:
        # A front end must fail fast when Redis is gone, never hang on a dead connection.
        transport.update(socket_connect_timeout=1.0, socket_timeout=2.0)
    return {
        "broker_url": settings.broker_url,
        # kombu's own class for any other scheme (e.g. redis+socket://)
        "broker_transport": (
            f"{__name__}:RedisTransport"
            if urlparse(settings.broker_url).scheme in ("redis", "rediss")
            else None
        ),
        # The worker stores each task's small summary dict in Redis. The client publishes with no
        # result backend: it reads our own result keys, and a Celery backend would subscribe to
        # a pub/sub channel per submitted job for nothing.
        "result_backend": None if client else settings.broker_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": visibility},
        "result_expires": settings.result_ttl_s,
        "task_default_queue": queue_name(settings.model_name),
        "task_create_missing_queues": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 2.0,
        "worker_pool": "threads",
        "worker_concurrency": settings.worker_concurrency,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "enable_utc": True,
    }


def make_app(settings: Settings, *, client: bool = False) -> Celery:
    """A Celery app for `settings` (which must name a broker)."""
    app = Celery("unmask", set_as_current=False)
    app.conf.update(celery_config(settings, client=client))
    return app
