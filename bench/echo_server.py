"""A bare grpc.aio echo of mist.v1.Extractor/Extract: the floor under any extractor's cost per image, measured by the
serving section (bench/serving.py) with the very client that drives the real server.

    python -m bench.echo_server --features answers.bin --listen 127.0.0.1:0
    # first line on stdout: "mist-echo listening on 127.0.0.1:PORT"; SIGTERM or SIGINT stops it

Each request is parsed as an ExtractRequest and answered at once with a prebuilt ExtractResponse (cycling through
the FeatureTensors in --features: real encodings captured from the real server, so the answers have its sizes),
serialized by ExtractResponse's serializer. No interceptors, no engine, no torch: only gRPC and protobuf, with the
product's server options (services.common.serving.server.server_options).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import struct
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc

from services.common.config import ServerConfig, parse_config
from services.common.pb import extractor_pb2, feature_pb2
from services.common.serving.server import server_options

METHOD = "/mist.v1.Extractor/Extract"
_LENGTH = struct.Struct("<I")


def write_features(path: Path, features: Sequence[feature_pb2.FeatureTensor]) -> None:
    """The --features file: each serialized FeatureTensor after its little-endian uint32 length."""
    path.write_bytes(b"".join(_LENGTH.pack(len(data)) + data for data in (f.SerializeToString() for f in features)))


def read_features(path: Path) -> list[feature_pb2.FeatureTensor]:
    data, features, at = path.read_bytes(), [], 0
    while at < len(data):
        (size,) = _LENGTH.unpack_from(data, at)
        features.append(feature_pb2.FeatureTensor.FromString(data[at + _LENGTH.size : at + _LENGTH.size + size]))
        at += _LENGTH.size + size
    if not features:
        raise ValueError(f"{path} holds no FeatureTensor")
    return features


def echo_handler(answers: Sequence[extractor_pb2.ExtractResponse]) -> grpc.GenericRpcHandler:
    """Extract as a bidi stream answering every request with the next prebuilt answer, in order."""

    async def extract(
        requests: AsyncIterator[extractor_pb2.ExtractRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[extractor_pb2.ExtractResponse]:
        cycle = itertools.cycle(answers)
        async for _request in requests:
            yield next(cycle)

    handler = grpc.stream_stream_rpc_method_handler(
        extract,
        request_deserializer=extractor_pb2.ExtractRequest.FromString,
        response_serializer=extractor_pb2.ExtractResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler("mist.v1.Extractor", {"Extract": handler})


async def serve(features_path: Path, listen: str) -> None:
    answers = [extractor_pb2.ExtractResponse(item_id="echo", features=[f]) for f in read_features(features_path)]
    config = parse_config(ServerConfig, [], {})  # the product's defaults: message limits, keepalive, streams
    server = grpc.aio.server(options=server_options(config))
    server.add_generic_rpc_handlers((echo_handler(answers),))
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"mist-echo listening on {listen.rpartition(':')[0]}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, required=True, help="FeatureTensors to answer with (write_features)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any free one)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.features, args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
