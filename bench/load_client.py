"""One load-generating client process of the serving section: its own channel (own TCP connection) per target, one
Extract stream per run, a window of requests in flight, prebuilt request bytes; only grpc and protobuf imported.

    python -m bench.load_client      # driven by bench/serving.py: one JSON command per stdin line, one reply per line
    {"cmd": "connect", "target": "127.0.0.1:50051", "requests": "/tmp/x/miss-0.pkl", "fresh": false}  -> {"ok": true}
    {"cmd": "close"}  -> {"ok": true}: every channel closed
    {"cmd": "run", "target": "127.0.0.1:50051", "requests": "/tmp/x/miss-0.pkl", "window": 32}
    -> {"images": 512, "answer_bytes": 73400320, "errors": 0, "cache_hits": 0, "t0": ..., "t1": ...}

t0 and t1 are time.monotonic() (CLOCK_MONOTONIC, one clock for every process of the machine), so the parent can
time several clients from the first one's start to the last one's end. Requests files are pickled lists of
serialized ExtractRequest messages; they are sent as they are (no serialization in the loop).
"""

from __future__ import annotations

import asyncio
import json
import pickle
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from services.common.pb import extractor_pb2

METHOD = "/mist.v1.Extractor/Extract"
# Distinct TCP connections per channel (grpc Python otherwise shares one per process and target), and room for
# ViT-B answers of any codec.
CHANNEL_OPTIONS = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
)


def _identity(data: bytes) -> bytes:
    return data


class LoadClient:
    """Channels by target and request lists by path, kept for the process's life."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._requests: dict[str, list[bytes]] = {}

    async def channel(self, target: str, *, fresh: bool = False) -> grpc.aio.Channel:
        """The channel to `target`, connected; `fresh`: close the one held and open a new TCP connection."""
        channel = self._channels.get(target)
        if channel is not None and fresh:
            await self._channels.pop(target).close()
            channel = None
        if channel is None:
            channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            await asyncio.wait_for(channel.channel_ready(), 60)
            self._channels[target] = channel
        return channel

    def requests(self, path: str) -> list[bytes]:
        if path not in self._requests:
            self._requests[path] = pickle.loads(Path(path).read_bytes())  # noqa: S301 (written by our parent)
        return self._requests[path]

    async def run(self, target: str, requests: Sequence[bytes], window: int) -> dict[str, Any]:
        """One stream over `requests` with at most `window` unanswered; counts answers, bytes, errors, hits."""
        call = (await self.channel(target)).stream_stream(
            METHOD, request_serializer=_identity, response_deserializer=_identity
        )
        room = asyncio.Semaphore(window)

        async def send() -> AsyncIterator[bytes]:
            for request in requests:
                await room.acquire()
                yield request

        images = answer_bytes = errors = hits = 0
        t0 = time.monotonic()
        async for raw in call(send()):
            room.release()
            answer = extractor_pb2.ExtractResponse.FromString(raw)
            images += 1
            answer_bytes += len(raw)
            errors += answer.HasField("error")
            hits += answer.cache_hit
        t1 = time.monotonic()
        return {
            "images": images,
            "answer_bytes": answer_bytes,
            "errors": errors,
            "cache_hits": hits,
            "t0": t0,
            "t1": t1,
        }

    async def close(self) -> None:
        """Close every channel: servers about to stop then have no connection to wind down."""
        while self._channels:
            await self._channels.popitem()[1].close()


async def serve_commands() -> None:
    client, loop = LoadClient(), asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = json.loads(line)
            try:
                if command["cmd"] == "close":
                    await client.close()
                    reply: dict[str, Any] = {"ok": True}
                elif command["cmd"] == "connect":
                    await client.channel(command["target"], fresh=bool(command.get("fresh")))
                    client.requests(command["requests"])
                    reply = {"ok": True}
                else:
                    requests = client.requests(command["requests"])
                    reply = await client.run(command["target"], requests, int(command["window"]))
            except Exception as error:  # reported to the parent, which fails the measurement with it
                reply = {"failed": f"{type(error).__name__}: {error}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        await client.close()


if __name__ == "__main__":
    asyncio.run(serve_commands())
