"""Minimal reproducer: grpc.aio's `ServicerContext.peer()` on a call that has ended crashes.

    python scripts/grpc_peer_after_end.py     # one child process per case; prints each outcome

Nothing of unmask is used: one grpc.aio server with one server-streaming method, one client.

- `finished`: peer() after a stream that ended normally;
- `cancelled`: peer() after the client cancelled the stream;
- `abandoned`: the handler's `finally` calls peer(); the client goes away while grpc awaits a
  write, so grpc cancels its own loop and never closes the generator; asyncio's garbage-collector
  hook closes it later, after the call has ended (the way `unmask serve` died).

Measured on this project's machine (Linux x86-64, CPython 3.11): grpcio 1.80.0 survives all
three; 1.81.0, 1.82.1, 1.83.0, 1.84.2, 1.85.1 and 1.85.3 segfault on the first call of each
(`segfault at 0 ... in cygrpc`). The server never does this: service/interceptors.py reads the
peer while the call is live and closes every stream's generator inside the call.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys

import grpc

CASES = ("finished", "cancelled", "abandoned")


def _bytes(b: bytes) -> bytes:
    return b


async def _one_then_end(request: bytes, context: grpc.aio.ServicerContext):
    _contexts.append(context)
    yield b"x"


async def _endless(request: bytes, context: grpc.aio.ServicerContext):
    _contexts.append(context)
    while True:
        yield b"x"
        await asyncio.sleep(0.001)


async def _peer_in_finally(request: bytes, context: grpc.aio.ServicerContext):
    try:
        while True:
            yield b"x" * 65536  # no await in between: the cancellation lands in grpc's write
    finally:
        context.peer()


_contexts: list[grpc.aio.ServicerContext] = []
_HANDLERS = {"finished": _one_then_end, "cancelled": _endless, "abandoned": _peer_in_finally}


async def _case(case: str) -> None:
    handler = grpc.unary_stream_rpc_method_handler(_HANDLERS[case], _bytes, _bytes)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", {"S": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for _ in range(5):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream("/t.T/S")(b"")
            async for _ in call:
                if case != "finished":
                    break
            call.cancel()
        await asyncio.sleep(0.05)
        gc.collect()  # the abandoned generator is closed from here
        await asyncio.sleep(0.01)
        if _contexts:
            _contexts.pop().peer()
    await server.stop(0)


def main() -> int:
    if len(sys.argv) == 2:
        asyncio.run(_case(sys.argv[1]))
        return 0
    print(f"grpcio {grpc.__version__}")
    crashed = 0
    for case in CASES:
        rc = subprocess.run([sys.executable, __file__, case], capture_output=True).returncode
        crashed += rc != 0
        outcome = "ok" if rc == 0 else ("segfault" if rc == -11 else f"exit {rc}")
        print(f"  peer() after the call ended ({case}): {outcome}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
