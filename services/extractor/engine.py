"""The extractor's core without gRPC: validate, then cache -> decode -> dynamic batch -> gather -> encode, in order.

    engine = ExtractionEngine(backbone, config, ExtractorMetrics(registry))
    await engine.start()
    async for response in engine.run_stream(requests):   # one whole Extract call, answers in request order
        ...
    await engine.close(drain=True)

Each stream has a bounded window of images in progress; a request that fails validation ends its stream after
the answers before it (InvalidArgumentError or FailedPreconditionError naming the item), while an image that
cannot be decoded or encoded is a per-item error. A stream idle for --stream-idle-timeout-s ends with
DeadlineExceededError.

Cache: an image is a hit only when every requested k is cached (one forward serves them all anyway); a hit skips
decoding and the forward entirely. Keys: backbone name and fingerprint, sha256 of the image bytes, mode, k, codec.

Threads: decoding, hashing and encoding run on `config.worker_threads` threads with one torch thread each (ToTensor
with several intra-op threads per worker oversubscribes the cores and is many times slower); the forward runs on
one thread with `config.forward_threads` torch threads. The event loop only moves messages.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from services.common.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    MistError,
    ResourceExhaustedError,
)
from services.common.pb import extractor_pb2, feature_pb2
from services.common.wire.codec import CodecConfig, FeatureCodec
from services.common.wire.gather_modes import (
    GatherModeName,
    baseline_bytes_per_image,
    mode_from_proto,
    mode_to_proto,
    validate_ks,
)
from services.extractor.backbone import LoadedBackbone
from services.extractor.batcher import DynamicBatcher
from services.extractor.cache import CacheKey, FeatureCache, cache_key, image_sha256
from services.extractor.config import ExtractorConfig
from services.extractor.gather import gather
from services.extractor.metrics import ExtractorMetrics
from services.extractor.preprocess import ImageDecodeError, ImagePreprocessor

_GRPC_INVALID_ARGUMENT = 3  # a grpc.StatusCode value in ItemError.code; this module does not import grpc
_NO_K = 0  # the wire's k for every mode but mist


@dataclass(frozen=True)
class WorkItem:
    """One validated request: everything needed to answer it."""

    index: int  # position in its stream, 0-based (error messages name it)
    item_id: str  # the client's name for the image, echoed back
    image: bytes  # encoded image bytes as received
    mode: GatherModeName  # which tensor to gather
    ks: tuple[int, ...]  # mist: each requested k in request order (repeats kept); other modes: (0,)
    codec: CodecConfig  # how to encode the features

    @property
    def unique_ks(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(self.ks))


@dataclass(frozen=True)
class BatchItem:
    """What the forward thread needs for one image."""

    image: torch.Tensor  # [3, H, W] float32, preprocessed
    mode: GatherModeName
    ks: tuple[int, ...]  # distinct; (0,) for the baselines


@dataclass(frozen=True)
class _Prepared:
    digest: str  # sha256 hex of the image bytes; "" when the cache is off
    cached: list[feature_pb2.FeatureTensor] | None  # every requested k from the cache, or None
    image: torch.Tensor | None  # the decoded image when not cached


class ExtractionEngine:
    """One loaded backbone serving any number of streams through one dynamic batcher and one feature cache."""

    def __init__(self, backbone: LoadedBackbone, config: ExtractorConfig, metrics: ExtractorMetrics) -> None:
        self._backbone = backbone
        self._config = config
        self._metrics = metrics
        self.backbone_id = feature_pb2.BackboneId(name=backbone.name, weights_fingerprint=backbone.weights_fingerprint)
        self._cache_id = f"{backbone.name}@{backbone.weights_fingerprint}"
        self._preprocessor = ImagePreprocessor(
            backbone.data_config, max_image_bytes=config.max_image_bytes, max_image_pixels=config.max_image_pixels
        )
        self.cache = FeatureCache(config.cache_max_bytes)
        # ToTensor / normalisation in several threads at once with several torch threads each oversubscribes
        # the cores; each worker gets one, the forward thread gets the rest.
        self._workers = ThreadPoolExecutor(
            config.worker_threads,
            thread_name_prefix="mist-extractor-cpu",
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
        self._forward_thread = ThreadPoolExecutor(
            1,
            thread_name_prefix="mist-extractor-forward",
            initializer=torch.set_num_threads,
            initargs=(config.forward_threads,),
        )
        self._batcher: DynamicBatcher[BatchItem, dict[int, np.ndarray]] = DynamicBatcher(
            self.run_batch,
            max_batch_size=config.max_batch_size,
            max_queue_delay_ms=config.max_queue_delay_ms,
            max_queue_items=config.queue_items,
            executor=self._forward_thread,
            on_batch=metrics.observe_batch,
        )
        self._info = self._backbone_info()
        self._streams = 0
        metrics.watch_cache(self.cache)
        metrics.set_baselines(baseline_bytes_per_image(backbone.geometry))

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the batcher on the running event loop."""
        self._batcher.start()

    async def close(self, drain: bool = True) -> None:
        """Run (drain=True) or fail what is queued, then release the threads."""
        await self._batcher.close(drain=drain)
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._forward_thread.shutdown(wait=False, cancel_futures=True)

    # ---- describe and validate ---------------------------------------------------------------------------------

    def describe(self) -> extractor_pb2.BackboneInfo:
        """What this server runs and what each gather mode costs per image."""
        info = extractor_pb2.BackboneInfo()
        info.CopyFrom(self._info)
        return info

    def _backbone_info(self) -> extractor_pb2.BackboneInfo:
        backbone, geometry, data = self._backbone, self._backbone.geometry, self._backbone.data_config
        return extractor_pb2.BackboneInfo(
            backbone=self.backbone_id,
            num_blocks=geometry.num_blocks,
            tokens=geometry.tokens,
            dims=geometry.dims,
            num_prefix_tokens=geometry.num_prefix_tokens,
            pretrained=backbone.pretrained,
            warning=backbone.warning,
            data_config=extractor_pb2.DataConfig(
                input_size=list(data["input_size"]),
                interpolation=str(data.get("interpolation", "")),
                mean=list(data.get("mean", ())),
                std=list(data.get("std", ())),
                crop_pct=float(data.get("crop_pct", 1.0)),
                crop_mode=str(data.get("crop_mode", "")),
            ),
            baselines=[
                extractor_pb2.BaselineCost(method=method, bytes_per_image=size)
                for method, size in baseline_bytes_per_image(geometry).items()
            ],
            max_image_bytes=self._config.max_image_bytes,
            max_image_pixels=self._config.max_image_pixels,
        )

    def validate(self, request: extractor_pb2.ExtractRequest, index: int) -> WorkItem:
        """Check a request's backbone, mode, ks and codec; errors name the item so a client can find it."""
        where = f"item #{index} (item_id {request.item_id!r})"
        try:
            self._check_expected_backbone(request.expect_backbone)
            mode = mode_from_proto(request.mode)
            ks = self._checked_ks(mode, request.ks)
            codec = CodecConfig.from_proto(request.codec)
        except FailedPreconditionError as error:
            raise FailedPreconditionError(f"{where}: {error}") from None
        except InvalidArgumentError as error:
            raise InvalidArgumentError(f"{where}: {error}") from None
        return WorkItem(index=index, item_id=request.item_id, image=request.image, mode=mode, ks=ks, codec=codec)

    def _check_expected_backbone(self, expected: feature_pb2.BackboneId) -> None:
        ours = self.backbone_id
        name_differs = expected.name and expected.name != ours.name
        weights_differ = expected.weights_fingerprint and expected.weights_fingerprint != ours.weights_fingerprint
        if name_differs or weights_differ:
            raise FailedPreconditionError(
                f"the client expects backbone {expected.name or '*'}@{expected.weights_fingerprint or '*'} but this "
                f"server runs {ours.name}@{ours.weights_fingerprint}; features of other weights must not be mixed"
            )

    def _checked_ks(self, mode: GatherModeName, ks: Sequence[int]) -> tuple[int, ...]:
        if mode != "mist":
            if ks:
                raise InvalidArgumentError(f"gather mode {mode!r} takes no k; got ks={list(ks)}")
            return (_NO_K,)
        validate_ks(ks, self._backbone.geometry.num_blocks)  # range and "at least one"; repeats are kept below
        return tuple(int(k) for k in ks)

    # ---- one image ---------------------------------------------------------------------------------------------

    async def extract(self, item: WorkItem) -> extractor_pb2.ExtractResponse:
        """Answer one image: from the cache, or decode -> batch -> forward -> encode."""
        loop = asyncio.get_running_loop()
        try:
            prepared = await loop.run_in_executor(self._workers, self._prepare, item)
            if prepared.cached is not None:
                self._metrics.cache_hits.inc()
                return self._answer(item, prepared.cached, cache_hit=True)
            if self.cache.enabled:
                self._metrics.cache_misses.inc()
            assert prepared.image is not None
            arrays = await self._batcher.submit(BatchItem(prepared.image, item.mode, item.unique_ks))
            features = await loop.run_in_executor(self._workers, self._encode, item, prepared.digest, arrays)
        except ImageDecodeError as error:
            return self._failed(item, error.to_item_error())
        except _UnencodableError as error:
            return self._failed(
                item,
                feature_pb2.ItemError(code=_GRPC_INVALID_ARGUMENT, reason="unencodable_features", message=str(error)),
            )
        return self._answer(item, features, cache_hit=False)

    def _prepare(self, item: WorkItem) -> _Prepared:
        """Worker thread: hash, look every k up in the cache, decode only if one is missing."""
        digest = image_sha256(item.image) if self.cache.enabled else ""
        if digest:
            found: dict[int, feature_pb2.FeatureTensor] = {}
            for k in item.unique_ks:
                data = self.cache.get(self._cache_key(item, digest, k))
                if data is None:
                    break  # one pass computes every k anyway: no point looking further
                found[k] = feature_pb2.FeatureTensor.FromString(data)
            else:
                return _Prepared(digest, [found[k] for k in item.ks], None)
        return _Prepared(digest, None, self._preprocessor.decode(item.image))

    def _encode(self, item: WorkItem, digest: str, arrays: dict[int, np.ndarray]) -> list[feature_pb2.FeatureTensor]:
        """Worker thread: encode each distinct k once, store it in the cache, answer in request order."""
        codec, mode = FeatureCodec(item.codec), mode_to_proto(item.mode)
        encoded: dict[int, feature_pb2.FeatureTensor] = {}
        for k in item.unique_ks:
            try:
                encoded[k] = codec.encode(arrays[k], backbone=self.backbone_id, mode=mode, k=k)
            except InvalidArgumentError as error:  # e.g. values beyond float16's range: this image, not the stream
                raise _UnencodableError(f"features of k={k} cannot be encoded as {item.codec.name}: {error}") from None
            if digest:
                self.cache.put(self._cache_key(item, digest, k), encoded[k].SerializeToString())
        return [encoded[k] for k in item.ks]

    def _cache_key(self, item: WorkItem, digest: str, k: int) -> CacheKey:
        return cache_key(self._cache_id, digest, item.mode, k, item.codec.name)

    def _answer(
        self, item: WorkItem, features: list[feature_pb2.FeatureTensor], cache_hit: bool
    ) -> extractor_pb2.ExtractResponse:
        self._metrics.served(item.mode, item.codec.name, "ok", features)
        return extractor_pb2.ExtractResponse(item_id=item.item_id, features=features, cache_hit=cache_hit)

    def _failed(self, item: WorkItem, error: feature_pb2.ItemError) -> extractor_pb2.ExtractResponse:
        self._metrics.served(item.mode, item.codec.name, error.reason)
        return extractor_pb2.ExtractResponse(item_id=item.item_id, error=error)

    # ---- one batch (the forward thread) ------------------------------------------------------------------------

    def run_batch(self, batch: list[BatchItem]) -> list[dict[int, np.ndarray]]:
        """One forward pass per gather mode present, to the deepest k any image needs; split per image."""
        results: list[dict[int, np.ndarray]] = [{} for _ in batch]
        by_mode: dict[GatherModeName, list[int]] = collections.defaultdict(list)
        for position, item in enumerate(batch):
            by_mode[item.mode].append(position)
        backbone = self._backbone
        for mode, positions in by_mode.items():
            images = torch.stack([batch[p].image for p in positions]).to(backbone.device)
            ks = sorted({k for p in positions for k in batch[p].ks}) if mode == "mist" else []
            with backbone.autocast():
                gathered = gather(backbone.model, images, mode, ks)
            on_host = {k: tensor.cpu().numpy() for k, tensor in gathered.items()}  # one copy per k, not per image
            for row, p in enumerate(positions):
                results[p] = {k: on_host[k][row] for k in batch[p].ks}
            self._metrics.forward_passes.labels(mode).inc()
        return results

    # ---- a whole stream ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _stream_slot(self) -> Iterator[None]:
        if self._streams >= self._config.max_streams:
            raise ResourceExhaustedError(
                f"the extractor already serves {self._streams} streams (--max-streams {self._config.max_streams}); "
                f"retry later or on another replica"
            )
        self._streams += 1
        self._metrics.streams_in_flight.inc()
        try:
            yield
        finally:
            self._streams -= 1
            self._metrics.streams_in_flight.dec()

    async def run_stream(
        self, requests: AsyncIterable[extractor_pb2.ExtractRequest]
    ) -> AsyncIterator[extractor_pb2.ExtractResponse]:
        """Answer a stream in order with at most `max_items_in_flight` of its images in progress.

        While the window is full nothing more is read, so gRPC flow control pushes back on the sender; while the
        consumer has not taken the next answer (a slow reader), nothing is read either. A request that fails
        validation stops the reading: the answers before it are still delivered, then its error ends the stream.
        With nothing in progress and no request for --stream-idle-timeout-s, the stream ends (DeadlineExceededError)
        so that a client which opens streams and sends nothing cannot hold the --max-streams slots.
        """
        limit, idle_timeout = self._config.max_items_in_flight, self.idle_timeout_s
        with self._stream_slot():
            reader = aiter(requests)
            pending: collections.deque[asyncio.Task[extractor_pb2.ExtractResponse]] = collections.deque()
            read: asyncio.Task[extractor_pb2.ExtractRequest] | None = None
            reading, failure, admitted = True, None, 0
            try:
                while True:
                    if read is None and reading and len(pending) < limit:
                        read = asyncio.ensure_future(_next(reader))
                    waiting = [task for task in (read, pending[0] if pending else None) if task is not None]
                    if not waiting:
                        break
                    # Nothing in progress: only the client can move this stream, and it gets idle_timeout to do so.
                    done, _ = await asyncio.wait(
                        waiting, timeout=idle_timeout if not pending else None, return_when=asyncio.FIRST_COMPLETED
                    )
                    if not done:
                        raise self.idle_error("request")
                    if read is not None and read.done():
                        finished, read = read, None
                        try:
                            pending.append(self._admit(finished.result(), admitted))
                            admitted += 1
                        except StopAsyncIteration:
                            reading = False
                        except MistError as error:
                            reading, failure = False, error
                    while pending and pending[0].done():
                        self._metrics.items_in_flight.dec()
                        yield pending.popleft().result()  # an exception (batcher closed, a bug) ends the stream
                if failure is not None:
                    raise failure
            finally:  # done, failed or cancelled by the client: abandon what is still in progress
                if read is not None:
                    read.cancel()
                for task in pending:
                    task.cancel()
                self._metrics.items_in_flight.dec(len(pending))

    @property
    def idle_timeout_s(self) -> float | None:
        """--stream-idle-timeout-s (None: streams may idle forever)."""
        return self._config.stream_idle_timeout_s or None

    def idle_error(self, waiting_for: str) -> DeadlineExceededError:
        """The error that ends a stream idle for too long, counted: waiting_for is 'request' or 'response'."""
        self._metrics.streams_ended_idle.labels(waiting_for).inc()
        what = (
            "no request arrived while nothing was in progress"
            if waiting_for == "request"
            else "the client did not read the next answer"
        )
        return DeadlineExceededError(
            f"stream ended after {self._config.stream_idle_timeout_s:g}s without progress: {what} "
            f"(--stream-idle-timeout-s); open a new stream to send more images"
        )

    def _admit(self, request: extractor_pb2.ExtractRequest, index: int) -> asyncio.Task[extractor_pb2.ExtractResponse]:
        """Count, validate and start one request; raises the validation error."""
        self._metrics.image_bytes_received.inc(len(request.image))
        task = asyncio.ensure_future(self._timed(self.extract(self.validate(request, index))))
        self._metrics.items_in_flight.inc()
        return task

    async def _timed(self, answer: Awaitable[extractor_pb2.ExtractResponse]) -> extractor_pb2.ExtractResponse:
        """`answer`, its time observed before the task completes (a done callback could run after the answer
        was already sent and counted)."""
        started = time.perf_counter()
        response = await answer
        self._metrics.image_latency.observe(time.perf_counter() - started)
        return response


async def _next(reader: AsyncIterator[extractor_pb2.ExtractRequest]) -> extractor_pb2.ExtractRequest:
    return await reader.__anext__()


class _UnencodableError(InvalidArgumentError):
    """Features of one image the requested codec cannot represent (a per-item error, not a stream error)."""
