"""A small blocking client of the extractor for scripts and the edge tuner: Describe, and Extract with a bounded number
of images in flight, results in request order, resuming on another connection when a server drains or restarts.

Imports grpc, protobuf and services.common only (no torch, no timm, nothing of services.extractor): it runs on devices.

    with ExtractorClient("127.0.0.1:50051") as client:
        info = client.describe()
        items = (ImageItem(path.name, path.read_bytes()) for path in paths)
        for result in client.extract(items, mode="mist", ks=(3, 6), codec="i8o-zstd"):
            features = [decode_feature(f) for f in result.features] if result.ok else result.error.reason

Resuming: results arrive in order, so the images without a result are always the last ones sent. When the stream
fails with UNAVAILABLE (a draining replica, a restart, a dropped link) or DEADLINE_EXCEEDED (the server ended a stream
left idle past its --stream-idle-timeout-s) the client waits for the channel, opens a new stream and re-sends exactly
those, then carries on with the rest: each image gets exactly one result. Other errors are
raised as the domain error of their status (errors.py: InvalidArgumentError for INVALID_ARGUMENT, ...).
"""

from __future__ import annotations

import collections
import queue
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import grpc

from services.common.clients.channel import create_channel, domain_error
from services.common.config import DEFAULT_MAX_MESSAGE_BYTES
from services.common.errors import DataLossError, InvalidArgumentError, UnavailableError
from services.common.pb import extractor_pb2, extractor_pb2_grpc, feature_pb2
from services.common.wire.codec import DEFAULT_CODEC, CodecConfig
from services.common.wire.gather_modes import BackboneId, GatherModeName, StageShape, check_mode, mode_to_proto

DEFAULT_MAX_IN_FLIGHT = 32  # the server's default window: enough to fill its batches from one stream
_FIRST_BACKOFF_S, _MAX_BACKOFF_S = 0.2, 5.0
# UNAVAILABLE: a draining replica, a restart, a dropped link. DEADLINE_EXCEEDED: the server ended a stream on which
# nothing moved for its --stream-idle-timeout-s (say `items` produced nothing for a while); no deadline is ever set on
# Extract here, so it cannot mean anything else.
_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class DataConfig:
    """The backbone's own preprocessing (timm's data config): what the extractor does to each image."""

    input_size: tuple[int, ...]  # (C, H, W)
    interpolation: str  # e.g. "bicubic"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    crop_mode: str


@dataclass(frozen=True)
class BackboneInfo:
    """What an extractor serves (its Describe answer), as plain values."""

    backbone: BackboneId  # name and weights fingerprint: features of other weights are refused
    num_blocks: int  # N: k ranges over 1..N (S stages on a hierarchical backbone)
    tokens: int  # T, prefix (class / register) tokens included; T_S (the last stage) when hierarchical
    dims: int  # D; D_S when hierarchical
    num_prefix_tokens: int
    pretrained: bool  # False: a random init, whose features carry little meaning
    warning: str  # set loudly when pretrained is False
    data_config: DataConfig
    baselines: dict[str, int]  # method ("lst", "last", "partial", "cls", "mist_f32"; hierarchical: "stages",
    # "last_stage", "mist_f32") -> float32 bytes per image
    max_image_bytes: int  # larger images get a per-item RESOURCE_EXHAUSTED
    max_image_pixels: int
    architecture: str = "vit"  # "vit" or "hierarchical" (pvt_v2: k is a stage)
    stages: tuple[StageShape, ...] = ()  # hierarchical only: each stage's output grid, stage 1 first

    @classmethod
    def from_proto(cls, message: extractor_pb2.BackboneInfo) -> BackboneInfo:
        data = message.data_config
        return cls(
            backbone=BackboneId.from_proto(message.backbone),
            num_blocks=message.num_blocks,
            tokens=message.tokens,
            dims=message.dims,
            num_prefix_tokens=message.num_prefix_tokens,
            pretrained=message.pretrained,
            warning=message.warning,
            data_config=DataConfig(
                tuple(data.input_size),
                data.interpolation,
                tuple(data.mean),
                tuple(data.std),
                data.crop_pct,
                data.crop_mode,
            ),  # fmt: skip
            baselines={b.method: b.bytes_per_image for b in message.baselines},
            max_image_bytes=message.max_image_bytes,
            max_image_pixels=message.max_image_pixels,
            architecture=message.architecture or "vit",
            stages=tuple(StageShape(s.tokens, s.dims, s.height, s.width) for s in message.stages),
        )


class ImageItem(NamedTuple):
    """One image to extract: the caller's id for it (echoed back) and its encoded bytes (JPEG, PNG or WebP)."""

    item_id: str
    image: bytes


@dataclass(frozen=True)
class ExtractResult:
    """The answer for one image: its features (one per requested k, in the order of `ks`) or an error."""

    item_id: str  # as sent
    features: tuple[feature_pb2.FeatureTensor, ...]  # empty when `error` is set
    error: feature_pb2.ItemError | None  # a per-item failure (undecodable, too large...); the stream went on
    cache_hit: bool  # served from the extractor's cache

    @property
    def ok(self) -> bool:
        return self.error is None


class _Outbox:
    """The request iterator of one stream attempt: gRPC's sending thread blocks on it until we put or close."""

    _CLOSED = object()

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()

    def put(self, request: extractor_pb2.ExtractRequest) -> None:
        self._queue.put(request)

    def close(self) -> None:
        """Half-close the stream (or release the sending thread of a failed attempt)."""
        self._queue.put(self._CLOSED)

    def __iter__(self) -> Iterator[extractor_pb2.ExtractRequest]:
        while (request := self._queue.get()) is not self._CLOSED:
            yield request  # type: ignore[misc]


class _Stream:
    """One extract() call's state across attempts: the source, the images sent without a result, the budget."""

    def __init__(
        self, items: Iterable[ImageItem | tuple[str, bytes]], template: extractor_pb2.ExtractRequest, max_in_flight: int
    ) -> None:
        self.source = iter(items)
        self.template = template
        self.max_in_flight = max_in_flight
        self.unanswered: collections.deque[ImageItem] = collections.deque()
        self.source_done = False

    def request(self, item: ImageItem) -> extractor_pb2.ExtractRequest:
        request = extractor_pb2.ExtractRequest()
        request.CopyFrom(self.template)
        request.item_id, request.image = item.item_id, item.image
        return request

    def refill(self, outbox: _Outbox) -> None:
        """Send new images until `max_in_flight` are unanswered; half-close when the source runs dry."""
        while not self.source_done and len(self.unanswered) < self.max_in_flight:
            try:
                item_id, image = next(self.source)
            except StopIteration:
                self.source_done = True
                outbox.close()
                return
            item = ImageItem(item_id, image)
            self.unanswered.append(item)
            outbox.put(self.request(item))

    def restart(self, outbox: _Outbox) -> None:
        """A new attempt: re-send what has no result yet (in order), half-closing if nothing else will come."""
        for item in self.unanswered:
            outbox.put(self.request(item))
        if self.source_done:
            outbox.close()


class ExtractorClient:
    """A channel to one extractor target (a host:port or a DNS name of several replicas); thread-safe to share."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        server_name: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_resumes: int = 5,
        resume_timeout_s: float = 30.0,
    ) -> None:
        if max_resumes < 0 or resume_timeout_s <= 0:
            raise InvalidArgumentError("max_resumes must be >= 0 and resume_timeout_s > 0")
        self.target = target
        self._channel = create_channel(
            target,
            tls=tls,
            tls_ca=tls_ca,
            client_cert=client_cert,
            client_key=client_key,
            token=token,
            server_name=server_name,
            max_message_bytes=max_message_bytes,
        )
        self._stub = extractor_pb2_grpc.ExtractorStub(self._channel)
        self._max_resumes = max_resumes  # consecutive resumable failures without a new result
        self._resume_timeout_s = resume_timeout_s  # how long one resume waits for a server to come back

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ExtractorClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def describe(self, timeout_s: float = 10.0) -> BackboneInfo:
        """The server's backbone (name, fingerprint, N, T, D, data config, pretrained?) and baseline costs."""
        try:
            return BackboneInfo.from_proto(self._stub.Describe(extractor_pb2.DescribeRequest(), timeout=timeout_s))
        except grpc.RpcError as error:
            raise domain_error(error) from None

    def extract(
        self,
        items: Iterable[ImageItem | tuple[str, bytes]],
        *,
        mode: GatherModeName = "mist",
        ks: Sequence[int] = (),
        codec: str | CodecConfig = DEFAULT_CODEC,
        expect_backbone: BackboneId | feature_pb2.BackboneId | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> Iterator[ExtractResult]:
        """One result per item, in order, with at most `max_in_flight` images sent and not yet answered.

        `items` is read lazily (a generator reading files is fine). `ks`: one or several k in [1, N] for mist, none
        for the baselines. `expect_backbone`: refuse (FailedPreconditionError) a server running other weights.
        """
        if max_in_flight < 1:
            raise InvalidArgumentError(f"max_in_flight must be >= 1; got {max_in_flight}")
        codec_config = codec if isinstance(codec, CodecConfig) else CodecConfig.parse(codec)
        template = extractor_pb2.ExtractRequest(
            mode=mode_to_proto(check_mode(mode)), ks=list(ks), codec=codec_config.to_proto()
        )
        if expect_backbone is not None:
            template.expect_backbone.CopyFrom(BackboneId.from_proto(expect_backbone).to_proto())
        return self._results(_Stream(items, template, max_in_flight))

    def _results(self, stream: _Stream) -> Iterator[ExtractResult]:
        failures = 0
        while True:
            outbox = _Outbox()
            stream.restart(outbox)
            call = self._stub.Extract(iter(outbox))
            try:
                for result in self._attempt(stream, call, outbox):
                    failures = 0
                    yield result
                return
            except grpc.RpcError as error:
                if error.code() not in _RESUMABLE or failures >= self._max_resumes:
                    raise domain_error(error) from None
                failures += 1
            finally:
                outbox.close()
                call.cancel()
            self._wait_before_resume(failures)

    def _attempt(
        self, stream: _Stream, call: Iterator[extractor_pb2.ExtractResponse], outbox: _Outbox
    ) -> Iterator[ExtractResult]:
        while True:
            stream.refill(outbox)
            if not stream.unanswered:
                for extra in call:  # the server ends the stream after our half-close; anything more is a bug
                    raise DataLossError(f"the extractor sent a result ({extra.item_id!r}) for no request")
                return
            response = next(call, None)
            if response is None:
                raise DataLossError(f"the extractor ended the stream with {len(stream.unanswered)} images unanswered")
            expected = stream.unanswered[0]
            if response.item_id != expected.item_id:
                raise DataLossError(
                    f"the extractor answered {response.item_id!r} where {expected.item_id!r} was next: out of order"
                )
            stream.unanswered.popleft()
            yield ExtractResult(
                item_id=response.item_id,
                features=tuple(response.features),
                error=response.error if response.HasField("error") else None,
                cache_hit=response.cache_hit,
            )

    def _wait_before_resume(self, failures: int) -> None:
        time.sleep(min(_MAX_BACKOFF_S, _FIRST_BACKOFF_S * 2 ** (failures - 1)))
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self._resume_timeout_s)
        except grpc.FutureTimeoutError:
            raise UnavailableError(
                f"the extractor at {self.target} did not come back within {self._resume_timeout_s:g}s"
            ) from None
