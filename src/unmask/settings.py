"""One settings object for every process (CLI, worker, server), from UNMASK_* variables.

Flags override the environment: `Settings.from_env().with_overrides(broker_url=args.broker)`.
The same names appear in compose.yaml (a test checks they agree). Torch-free.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from unmask.errors import InvalidArgument

ENV_PREFIX = "UNMASK_"


@dataclass(frozen=True)
class Settings:
    broker_url: str = ""  # redis://host:port/db; empty = embedded (in-process Engine, no Redis)
    model: str = ""  # model directory; empty = the shipped default model
    model_name: str = "default"  # the name clients ask for; one Celery queue per model name
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_batch: int = 16  # jobs the Engine batches per denoising step
    max_queue: int = 256  # queued jobs per model before submissions are refused
    worker_concurrency: int = 8  # task threads feeding one Engine in a worker
    result_ttl_s: int = 24 * 3600  # results and payloads expire from Redis after this
    stream_maxlen: int = 2000  # events kept per job stream
    task_soft_time_limit_s: int = 300
    task_time_limit_s: int = 360  # hard limit; the visibility timeout must exceed it
    visibility_timeout_s: int = 600  # last-resort redelivery (lost workers: see heartbeat_s)
    heartbeat_s: float = 2.0  # workers announce themselves this often; 3 missed = lost
    max_deliveries: int = 3  # a job whose worker died on each of this many deliveries fails
    host: str = "127.0.0.1"
    port: int = 50051
    auth_tokens: tuple[str, ...] = field(default=())  # bearer tokens; empty = auth off
    tls_cert: str = ""
    tls_key: str = ""
    max_message_bytes: int = 16 << 20  # gRPC send/receive limit, server and client
    batch_window: int = 32  # items of one batch job in flight at once (the rest wait)
    max_batch_items: int = 50_000  # items per batch job
    metrics_port: int = 0  # Prometheus /metrics on this port (front end or worker); 0 = off
    http_port: int = 0  # `unmask serve`: the HTTP gateway in the same process; 0 = off

    def __post_init__(self) -> None:
        if self.broker_url and not self.broker_url.startswith(("redis://", "rediss://")):
            raise InvalidArgument(
                "must be a redis:// URL", field="broker_url", value=self.broker_url
            )
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise InvalidArgument(
                "must exceed task_time_limit_s so a running job is not redelivered",
                field="visibility_timeout_s",
                value=self.visibility_timeout_s,
            )
        for name in ("max_batch", "max_queue", "worker_concurrency", "result_ttl_s", "port",
                     "max_message_bytes", "batch_window", "max_batch_items",
                     "max_deliveries"):  # fmt: skip
            if getattr(self, name) < 1:
                raise InvalidArgument("must be >= 1", field=name, value=getattr(self, name))
        if not 0 <= self.metrics_port <= 65535:
            raise InvalidArgument("must be 0 (off) to 65535", field="metrics_port",
                                  value=self.metrics_port)  # fmt: skip
        if not 0 <= self.http_port <= 65535:
            raise InvalidArgument("must be 0 (off) to 65535", field="http_port",
                                  value=self.http_port)  # fmt: skip

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """field name -> environment variable name."""
        return {f.name: ENV_PREFIX + f.name.upper() for f in dataclasses.fields(cls)}

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f, raw)
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def embedded(self) -> bool:
        return not self.broker_url


def _parse(f: dataclasses.Field, raw: str) -> Any:
    name = ENV_PREFIX + f.name.upper()
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    try:
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            return tuple(t.strip() for t in raw.split(",") if t.strip())
    except ValueError as exc:
        raise InvalidArgument(f"cannot parse {raw!r}", field=name) from exc
    return raw
