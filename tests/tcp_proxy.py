"""A small threaded TCP proxy for fault tests: put it between a client and a server, then cut
the link and restore it.

    proxy = TcpProxy("127.0.0.1", redis_port).start()   # listens on proxy.port
    proxy.cut()              # "reset": every open connection is closed, new ones are refused
    proxy.cut("blackhole")   # connections stay open but nothing gets through (a dead network)
    proxy.restore()          # new connections go through again
    proxy.stop()

Import from a test module (`tests/` is on sys.path): `from tcp_proxy import TcpProxy`.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading

CHUNK = 64 * 1024


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.mode = "open"  # open | reset | blackhole
        self.accepted = 0  # connections accepted since start (including refused ones)
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._held: list[socket.socket] = []  # blackholed connections, kept open
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    # ---- control ---------------------------------------------------------------------------
    def start(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        listener.settimeout(0.1)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._thread.start()
        return self

    def cut(self, mode: str = "reset") -> None:
        """Break the link. reset: close every connection (peers see a reset / EOF at once) and
        refuse new ones. blackhole: keep connections open but forward nothing (peers wait
        until their own timeouts fire)."""
        if mode not in ("reset", "blackhole"):
            raise ValueError(f"unknown mode {mode!r}")
        with self._lock:
            self.mode = mode
            pairs, self._pairs = self._pairs, []
        if mode == "reset":
            for a, b in pairs:
                _reset(a)
                _reset(b)
        else:
            with self._lock:
                self._held.extend(s for pair in pairs for s in pair)

    def restore(self) -> None:
        """New connections go through again; blackholed ones are closed (their peers reconnect)."""
        with self._lock:
            self.mode = "open"
            held, self._held = self._held, []
        _close(*held)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            pairs, self._pairs = self._pairs, []
            held, self._held = self._held, []
        for a, b in pairs:
            _close(a, b)
        _close(*held)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self if self.port else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- plumbing --------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with self._lock:
                mode = self.mode
                if mode == "blackhole":
                    self._held.append(client)
                    continue
            if mode == "reset":
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2.0)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                if self.mode != "open":  # cut while we were connecting
                    _close(client, upstream)
                    continue
                self._pairs.append((client, upstream))
            threading.Thread(
                target=self._pump, args=(client, upstream), name="tcp-proxy-pump", daemon=True
            ).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        """Copy both ways until either side closes or the pair is cut."""
        peer = {a: b, b: a}
        try:
            while not self._stop.is_set():
                with self._lock:
                    if (a, b) not in self._pairs:
                        return  # cut: reset closed the sockets, blackhole holds them
                try:
                    readable, _, _ = select.select([a, b], [], [], 0.1)
                except (OSError, ValueError):
                    break
                for s in readable:
                    try:
                        data = s.recv(CHUNK)
                    except OSError:
                        data = b""
                    if not data:
                        raise EOFError
                    with self._lock:
                        if (a, b) not in self._pairs:
                            return
                    peer[s].sendall(data)
        except (EOFError, OSError):
            pass
        with self._lock:
            if (a, b) not in self._pairs:
                return
            self._pairs.remove((a, b))
        _close(a, b)


def _reset(s: socket.socket) -> None:
    """Close with RST rather than FIN, as a dropped link looks to the peer."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.close()


def _close(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()
