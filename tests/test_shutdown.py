"""Stopping a front end never hangs: each phase of UnmaskServer.stop() has a time limit, and a
phase that overruns is logged with the stacks of what it waited for, then skipped."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from unmask.client import Client, ServiceError
from unmask.service import server as server_module
from unmask.service.dispatch import LocalDispatcher
from unmask.service.server import ServerThread
from unmask.settings import Settings


class Stubborn(LocalDispatcher):
    """Following a job swallows the first cancellation (a handler that does not end when grpc
    cancels it), and close() never returns (a queue call stuck in a client library)."""

    swallowed = 0

    async def events(self, job_id):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            Stubborn.swallowed += 1
            await asyncio.sleep(3600)  # the next cancellation ends it
        yield {}

    async def close(self) -> None:
        await super().close()
        await asyncio.sleep(3600)


def test_stop_ends_in_bounded_time_and_says_what_it_waited_for(tiny_model_dir, monkeypatch,
                                                                caplog):  # fmt: skip
    from unmask.models.generation import Generator

    monkeypatch.setattr(server_module, "STOP_PHASE_S", 1.0)
    monkeypatch.setattr(server_module, "CANCEL_DRAIN_S", 1.0)
    Stubborn.swallowed = 0
    settings = Settings()
    srv = ServerThread(settings, dispatcher=Stubborn(settings, Generator.load(tiny_model_dir)))
    srv.start()
    outcome: list[object] = []

    def call() -> None:
        with Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
            try:
                outcome.append(c.generate("x", gen_length=4, steps=2))
            except ServiceError as exc:
                outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 30
    while not srv.server.servicer._holding and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.05)
    t0 = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="unmask.service"):
        srv.stop()
    took = time.monotonic() - t0
    caller.join(30)
    assert took < 10, f"stop took {took:.1f} s"  # unbounded, the dispatcher alone: an hour
    assert Stubborn.swallowed == 1  # the handler was cancelled, swallowed it, was cancelled again
    assert "shutdown: dispatcher took over" in caplog.text
    assert "-- task" in caplog.text and "Stubborn.close" in caplog.text  # where it waited
    assert outcome and isinstance(outcome[0], ServiceError), outcome
    assert srv.loop.is_closed()
