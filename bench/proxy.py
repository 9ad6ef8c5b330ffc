"""A byte-counting TCP proxy on 127.0.0.1: what a gRPC call really puts on the socket, in each direction.

    with ByteCountingProxy(server.target) as proxy:      # clients dial proxy.target instead of the server
        ...; proxy.wait_idle(); proxy.counts().to_client  # HTTP/2 + gRPC framing + payload, server -> client

It counts TCP payload bytes (what send() hands the kernel): HTTP/2 frames, headers, gRPC length prefixes, pings
and window updates included; TCP/IP/Ethernet headers are not (the edge-link benchmark reads those from veth
counters).
"""

from __future__ import annotations

import socket
import threading
from typing import NamedTuple

_CHUNK_BYTES = 1 << 16
_ACCEPT_POLL_S = 0.2  # how often the accept loop notices stop()


class ByteCounts(NamedTuple):
    to_client: int  # bytes relayed from the server to clients (responses: the feature traffic)
    to_server: int  # bytes relayed from clients to the server (requests: the images)
    connections: int  # connections accepted since the last reset


class ByteCountingProxy:
    """Relays every connection made to `target` to `upstream` ("host:port") and counts the bytes relayed."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_ACCEPT_POLL_S)
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._to_client = self._to_server = self._connections = self._active = 0
        self._stopping = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name="bench-proxy-accept", daemon=True)
        self._sockets: set[socket.socket] = set()

    def start(self) -> ByteCountingProxy:
        self._acceptor.start()
        return self

    def counts(self) -> ByteCounts:
        with self._lock:
            return ByteCounts(self._to_client, self._to_server, self._connections)

    def reset(self) -> None:
        """Zero the counters (call between measurements, with no connection open)."""
        with self._lock:
            self._to_client = self._to_server = self._connections = 0

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Wait until every relayed connection has closed, so the counts are final; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout_s)

    def stop(self) -> None:
        """Stop accepting and close every open connection."""
        self._stopping.set()
        if self._acceptor.is_alive():
            self._acceptor.join()
        self._listener.close()
        with self._lock:
            for sock in list(self._sockets):
                _shutdown_quietly(sock)  # the pumps wake up, finish and close both ends

    def __enter__(self) -> ByteCountingProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self._upstream)
            except OSError:
                _close_quietly(client)  # the client sees a reset, as it would without the proxy
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # add no latency of our own
            with self._lock:
                self._connections += 1
                self._active += 1
                self._sockets.update((client, server))
            done = threading.Barrier(2, action=lambda c=client, s=server: self._closed(c, s))
            for source, sink, to_client in ((client, server, False), (server, client, True)):
                threading.Thread(
                    target=self._pump, args=(source, sink, to_client, done), daemon=True, name="bench-proxy-pump"
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, to_client: bool, done: threading.Barrier) -> None:
        try:
            while chunk := source.recv(_CHUNK_BYTES):
                sink.sendall(chunk)
                with self._lock:
                    if to_client:
                        self._to_client += len(chunk)
                    else:
                        self._to_server += len(chunk)
            sink.shutdown(socket.SHUT_WR)  # pass the half-close on: gRPC ends streams this way
        except OSError:
            _shutdown_quietly(sink)  # a reset on one side ends the other (shutdown wakes a blocked recv)
        finally:
            done.wait()

    def _closed(self, client: socket.socket, server: socket.socket) -> None:
        for sock in (client, server):
            _close_quietly(sock)
        with self._idle:
            self._sockets.difference_update((client, server))
            self._active -= 1
            self._idle.notify_all()


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _shutdown_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
