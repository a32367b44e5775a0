"""`unmask worker`: a Celery worker serving one model's queue from Redis.

Settings come from UNMASK_* variables; the flags override them. Without a broker the command
refuses to start (the embedded mode runs the model in-process and needs no worker).
"""

from __future__ import annotations

import argparse
import os
import socket


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="serve a model's job queue from Redis (Celery worker, threads pool, one Engine)",
    )
    p.add_argument("--broker", default=None, help="redis://HOST:PORT/DB (env UNMASK_BROKER_URL)")
    p.add_argument("--model", default=None, help="model directory (env UNMASK_MODEL)")
    p.add_argument(
        "--model-name", default=None, help="name clients ask for = queue (env UNMASK_MODEL_NAME)"
    )
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (env UNMASK_DEVICE)")
    p.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16"),
                   help="weights' dtype; auto = bf16 where native (env UNMASK_DTYPE)")  # fmt: skip
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="task threads feeding the one Engine (env UNMASK_WORKER_CONCURRENCY)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="Prometheus /metrics on this port, 0 = off (env UNMASK_METRICS_PORT)",
    )
    p.add_argument("--loglevel", default="INFO", help="DEBUG | INFO | WARNING | ERROR")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from unmask.errors import InvalidArgument
    from unmask.settings import Settings

    if args.dtype:  # read where the model loads (models/checkpoint.py inference_dtype)
        os.environ["UNMASK_DTYPE"] = args.dtype
    settings = Settings.from_env().with_overrides(
        broker_url=args.broker,
        model=args.model,
        model_name=args.model_name,
        device=args.device,
        worker_concurrency=args.concurrency,
        metrics_port=args.metrics_port,
    )
    if settings.embedded:
        raise InvalidArgument(
            "`unmask worker` needs a Redis broker: set UNMASK_BROKER_URL or pass "
            "--broker redis://HOST:PORT/0 (without a broker, `unmask serve` and "
            "`unmask generate` run the model in-process)",
            field="broker_url",
        )
    from unmask.workers import tasks
    from unmask.workers.celery_app import make_app
    from unmask.workers.client import check_broker
    from unmask.workers.protocol import queue_name

    check_broker(settings.broker_url)
    if settings.metrics_port:  # the exporter starts once the model has loaded: check now
        from unmask.metrics import check_port

        check_port(settings.host, settings.metrics_port)
    app = make_app(settings)
    nodename = f"{settings.model_name}-{os.getpid()}@{socket.gethostname()}"
    tasks.configure(app, settings, hostname=nodename)
    # pool, concurrency, prefetch and acks come from the app's configuration (celery_app.py)
    app.worker_main(
        [
            "worker",
            f"--loglevel={args.loglevel}",
            f"--queues={queue_name(settings.model_name)}",
            f"--hostname={nodename}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )
    return 0
