"""The extractor's core without gRPC: validate, then cache -> decode -> dynamic batch -> forward -> encode, in order.

    engine = ExtractionEngine(backbone, config, ExtractorMetrics(registry))
    await engine.start()
    async for response in engine.run_stream(requests):   # one whole Extract call, answers in request order
        ...
    await engine.close(drain=True)

Each stream has a bounded window of images in progress (stream.py); a request that fails validation ends its stream
after the answers before it (InvalidArgumentError or FailedPreconditionError naming the item), while an image that
cannot be decoded or encoded is a per-item error. A stream idle for --stream-idle-timeout-s ends with
DeadlineExceededError.

Work per batch, not per image. On the event loop, per image: validation and, for images up to 1 MiB, the sha256 and
the cache lookup, so a cache hit is answered there without a thread hop; a miss is queued in the dynamic batcher as
a future (no task). Per batch, in one batcher thread: decode to uint8 on the CPU (split over --decode-threads, one
hand-off per thread, not per image), then under the forward lock: stack, copy the uint8 batch to the backbone's
device, normalise, gather, quantize to int8 there (quantize.py) and copy only int8 values and scales back; then
compress and build the answers (split over the same threads; zstd contexts are reused per thread). The batcher
settles the batch's futures in one loop callback. On a GPU two batches are in flight, so the next one decodes while
this one runs forward.

Cache: an image is a hit only when every requested k is cached (one forward serves them all anyway); a hit skips
decoding and the forward entirely. Keys: backbone name and fingerprint, sha256 of the image bytes, mode, k, codec.

A hierarchical backbone (pvt_v2) serves mist with k a stage in [1, S], stages (one tensor per stage, k = 1..S, each
of its own shape) and last_stage; a ViT serves mist and the four ViT baselines. A mode the backbone does not serve is
refused at validation like any bad mode.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from services.common.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from services.common.pb import extractor_pb2, feature_pb2
from services.common.wire.codec import CodecConfig, FeatureCodec
from services.common.wire.gather_modes import (
    GatherModeName,
    baseline_bytes_per_image,
    check_mode_served,
    mode_from_proto,
    mode_to_proto,
    validate_ks,
)
from services.extractor.backbone import LoadedBackbone
from services.extractor.batcher import DynamicBatcher
from services.extractor.cache import CacheKey, FeatureCache, image_sha256
from services.extractor.config import ExtractorConfig
from services.extractor.gather import gather
from services.extractor.metrics import ExtractorMetrics
from services.extractor.preprocess import ImageDecodeError, ImagePreprocessor
from services.extractor.quantize import quantize_images_i8o, quantize_rows_i8
from services.extractor.stream import OrderedStream

_GRPC_INVALID_ARGUMENT = 3  # a grpc.StatusCode value in ItemError.code; this module does not import grpc
_NO_K = 0  # the wire's k for every mode but mist
# Images up to this size are hashed on the event loop (sha256 runs at about 2 GB/s: 0.5 ms at most), so a cache hit
# needs no thread; larger ones are hashed in the batch thread, where a hit still skips the decode and the forward.
_INLINE_HASH_MAX_BYTES = 1 << 20
# Work worth another thread: about 0.5 ms of decoding (a few 224 px JPEGs) or compressing (a few ViT-B tensors).
_BYTES_PER_THREAD = 128 << 10
_MAX_REMEMBERED_CODECS = 256  # distinct codec specs remembered by validate (2 x 4 x 22 x 2 valid ones exist)
ExtractResponse = extractor_pb2.ExtractResponse


@dataclass(frozen=True)
class WorkItem:
    """One validated request: everything needed to answer it."""

    index: int  # position in its stream, 0-based (error messages name it)
    item_id: str  # the client's name for the image, echoed back
    image: bytes  # encoded image bytes as received
    mode: GatherModeName  # which tensor to gather
    ks: tuple[int, ...]  # mist: each requested k in request order (repeats kept); stages: 1..S; other modes: (0,)
    codec: CodecConfig  # how to encode the features

    @functools.cached_property  # read per k and per stage on the hot path
    def unique_ks(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(self.ks))


@dataclass
class Job:
    """One cache miss on its way through a batch: filled in by the stages, read by the next."""

    item: WorkItem
    digest: str  # sha256 hex of the image bytes; "" when the cache is off or the image was too large to hash inline
    admitted_at: float  # time.perf_counter() when the request was admitted (image latency)
    pixels: torch.Tensor | None = None  # uint8 [3, H, W] after decoding (on the device with --image-decode cuda)
    features: dict[int, HostFeatures] = field(default_factory=dict)  # per distinct k, after the forward


@dataclass(frozen=True)
class HostFeatures:
    """One image's features for one k, on the host: int8 values and scales for i8 and i8o codecs (and the outlier
    columns for i8o), float32 otherwise."""

    floats: np.ndarray | None = None  # [T, D] float32
    quantized: np.ndarray | None = None  # [T, D] int8
    scales: np.ndarray | None = None  # [T] float32
    outlier_columns: np.ndarray | None = None  # i8o: [columns] int64
    outlier_values: np.ndarray | None = None  # i8o: [T, columns] float32


class ExtractionEngine:
    """One loaded backbone serving any number of streams through one dynamic batcher and one feature cache."""

    def __init__(self, backbone: LoadedBackbone, config: ExtractorConfig, metrics: ExtractorMetrics) -> None:
        self._backbone = backbone
        self._config = config
        self._metrics = metrics
        self.backbone_id = feature_pb2.BackboneId(name=backbone.name, weights_fingerprint=backbone.weights_fingerprint)
        self._cache_id = f"{backbone.name}@{backbone.weights_fingerprint}"
        self._preprocessor = ImagePreprocessor(
            backbone.data_config,
            max_image_bytes=config.max_image_bytes,
            max_image_pixels=config.max_image_pixels,
            resize=config.resize,
        )
        self._decode_on = torch.device(backbone.device) if config.image_decode == "cuda" else None
        self.cache = FeatureCache(config.cache_max_bytes)
        self._codecs: dict[CodecConfig, FeatureCodec] = {}
        self._codec_configs: dict[tuple[int, int, int, bool], CodecConfig] = {}
        # Decoding and encoding threads get one torch thread each: several intra-op threads per worker oversubscribe
        # the cores. The batch threads run the forward with the rest.
        self._workers = ThreadPoolExecutor(
            config.worker_threads,
            thread_name_prefix="mist-extractor-cpu",
            initializer=_own_torch_threads,
            initargs=(1,),
        )
        # Two batches in flight on an accelerator: one decodes or encodes on the CPU while the other runs forward.
        # On a CPU both would compete for the same cores, so one.
        concurrent_batches = 2 if backbone.device != "cpu" else 1
        self._batch_threads = ThreadPoolExecutor(
            concurrent_batches,
            thread_name_prefix="mist-extractor-batch",
            initializer=_own_torch_threads,
            initargs=(1,),  # forward() raises it to --torch-threads around the forward itself
        )
        self._forward_lock = threading.Lock()  # one forward at a time on the device
        self._batcher: DynamicBatcher[Job, ExtractResponse] = DynamicBatcher(
            self.run_batch,
            max_batch_size=config.max_batch_size,
            max_queue_delay_ms=config.max_queue_delay_ms,
            max_queue_items=config.queue_items,
            executor=self._batch_threads,
            on_batch=metrics.observe_batch,
            max_concurrent_batches=concurrent_batches,
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
        self._batch_threads.shutdown(wait=False, cancel_futures=True)

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
            architecture=geometry.architecture,
            stages=[
                extractor_pb2.StageInfo(tokens=stage.tokens, dims=stage.dims, height=stage.height, width=stage.width)
                for stage in geometry.stages
            ],
        )

    def validate(self, request: extractor_pb2.ExtractRequest, index: int) -> WorkItem:
        """Check a request's backbone, mode, ks and codec; errors name the item so a client can find it."""
        where = f"item #{index} (item_id {request.item_id!r})"
        try:
            self._check_expected_backbone(request.expect_backbone)
            mode = mode_from_proto(request.mode)
            ks = self._checked_ks(mode, request.ks)
            codec = self._codec_config(request.codec)
        except FailedPreconditionError as error:
            raise FailedPreconditionError(f"{where}: {error}") from None
        except InvalidArgumentError as error:
            raise InvalidArgumentError(f"{where}: {error}") from None
        return WorkItem(index=index, item_id=request.item_id, image=request.image, mode=mode, ks=ks, codec=codec)

    def _codec_config(self, spec: feature_pb2.CodecSpec) -> CodecConfig:
        """CodecConfig.from_proto, remembered per distinct spec (a stream repeats the same one for every image)."""
        key = (spec.dtype, spec.compression, spec.zstd_level, spec.no_byte_shuffle)
        config = self._codec_configs.get(key)
        if config is None:
            config = CodecConfig.from_proto(spec)  # raises for a bad spec: nothing is remembered then
            if len(self._codec_configs) < _MAX_REMEMBERED_CODECS:
                self._codec_configs[key] = config
        return config

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
        geometry = self._backbone.geometry
        check_mode_served(geometry, mode)
        if mode != "mist":
            if ks:
                per_stage = f" (it answers every stage, k = 1 .. {geometry.num_blocks})" if mode == "stages" else ""
                raise InvalidArgumentError(f"gather mode {mode!r} takes no k; got ks={list(ks)}{per_stage}")
            return tuple(range(1, geometry.num_blocks + 1)) if mode == "stages" else (_NO_K,)
        validate_ks(ks, geometry.num_blocks, geometry.k_unit)  # range and "at least one"; repeats are kept below
        return tuple(int(k) for k in ks)

    # ---- one image on the event loop ---------------------------------------------------------------------------

    async def extract(self, item: WorkItem) -> ExtractResponse:
        """Answer one image: from the cache, or through a batch."""
        started = self._start(item)
        return started if isinstance(started, ExtractResponse) else await started

    def _admit(self, request: extractor_pb2.ExtractRequest, index: int) -> ExtractResponse | asyncio.Future:
        """Count, validate and start one request of a stream; raises the validation (or queue-full) error."""
        self._metrics.image_bytes_received.inc(len(request.image))
        started = self._start(self.validate(request, index))
        self._metrics.items_in_flight.inc()
        return started

    def _start(self, item: WorkItem) -> ExtractResponse | asyncio.Future[ExtractResponse]:
        """The answer now (a cache hit), or the batcher's future of it."""
        admitted_at = time.perf_counter()
        digest = ""
        if self.cache.enabled and len(item.image) <= _INLINE_HASH_MAX_BYTES:
            digest = image_sha256(item.image)
            hit = self._cached_answer(item, digest, admitted_at)
            if hit is not None:
                return hit
        return self._batcher.submit_nowait(Job(item, digest, admitted_at))

    def _cached_answer(self, item: WorkItem, digest: str, admitted_at: float) -> ExtractResponse | None:
        """Every requested k from the cache as an answer, or None when one is missing (a miss is counted once the
        image has decoded: the metric counts images that needed a forward pass)."""
        found: dict[int, bytes] = {}
        for k in item.unique_ks:
            data = self.cache.get(self._cache_key(item, digest, k))
            if data is None:
                return None  # one pass computes every k anyway: no point looking further
            found[k] = data
        response = ExtractResponse(item_id=item.item_id, cache_hit=True)
        for k in item.ks:
            response.features.add().MergeFromString(found[k])  # parsed straight into the answer, no extra copy
        self._metrics.cache_hits.inc()
        self._metrics.served(item.mode, item.codec.name, "ok", response.features)
        self._metrics.image_latency.observe(time.perf_counter() - admitted_at)
        return response

    def _cache_key(self, item: WorkItem, digest: str, k: int) -> CacheKey:
        # Built directly, not through cache_key(): every part comes from a validated item and a sha256 hex digest.
        return CacheKey(self._cache_id, digest, item.mode, k, item.codec.name)

    # ---- one batch (a batch thread) ----------------------------------------------------------------------------

    def run_batch(self, jobs: list[Job]) -> list[ExtractResponse]:
        """Decode, forward and encode a batch; one answer per job, in order (per-item errors inside answers)."""
        answers: list[ExtractResponse | None] = [None] * len(jobs)
        image_bytes = sum(len(job.item.image) for job in jobs)
        self._in_parallel(lambda chunk: self._decode(jobs, answers, chunk), range(len(jobs)), image_bytes)
        todo = [job for job, answer in zip(jobs, answers, strict=True) if answer is None]
        if todo:
            with self._forward_lock:
                feature_bytes = self.forward(todo)
            positions = [i for i, answer in enumerate(answers) if answer is None]
            self._in_parallel(lambda chunk: self._encode_each(jobs, answers, chunk), positions, feature_bytes)
        return answers  # type: ignore[return-value]  # every slot is filled by now

    def _in_parallel(self, work: Callable[[Sequence[int]], None], positions: Sequence[int], work_bytes: int) -> None:
        """`work(chunk)` over the positions split into one chunk per CPU thread: one hand-off per thread, this one
        works too.

        Small batches stay on this thread: decoding a 32 px PNG or compressing a tiny model's features is mostly
        Python holding the GIL, so a second thread adds hand-offs and GIL trades but no parallel work."""
        parts = min(self._config.worker_threads, len(positions), 1 + work_bytes // _BYTES_PER_THREAD)
        if parts <= 1:
            work(positions)
            return
        chunks = [positions[part::parts] for part in range(parts)]
        futures = [self._workers.submit(work, chunk) for chunk in chunks[1:]]
        work(chunks[0])
        for future in futures:
            future.result()

    def _decode(self, jobs: Sequence[Job], answers: list[ExtractResponse | None], chunk: Sequence[int]) -> None:
        """A CPU thread, for its chunk of a batch: the late cache lookup of a large image, then decoding to uint8
        (same-sized images resized together: ImagePreprocessor.load_uint8_many)."""
        on_host: list[int] = []
        for i in chunk:
            job = jobs[i]
            if self.cache.enabled and not job.digest:
                job.digest = image_sha256(job.item.image)
                hit = self._cached_answer(job.item, job.digest, job.admitted_at)
                if hit is not None:
                    answers[i] = hit
                    continue
            if self._decode_on is None:
                on_host.append(i)
                continue
            try:
                self._decoded(job, self._preprocessor.load_on_device(job.item.image, self._decode_on))
            except ImageDecodeError as error:
                answers[i] = self._failed(job, error.to_item_error())
        loaded = self._preprocessor.load_uint8_many([jobs[i].item.image for i in on_host])
        for i, pixels in zip(on_host, loaded, strict=True):
            if isinstance(pixels, ImageDecodeError):
                answers[i] = self._failed(jobs[i], pixels.to_item_error())
            else:
                self._decoded(jobs[i], pixels)

    def _decoded(self, job: Job, pixels: torch.Tensor) -> None:
        job.pixels = pixels
        if self.cache.enabled:
            self._metrics.cache_misses.inc()

    def forward(self, jobs: Sequence[Job]) -> int:
        """One forward pass per gather mode present, to the deepest k any image needs; fills each job's features and
        returns how many bytes of features came to the host.

        The float work (normalising, quantizing) runs on the backbone's device; what comes back to the host is int8
        values and scales for images asking for an i8 codec, float32 for the others, one copy per k and kind.
        """
        backbone, host_bytes = self._backbone, 0
        by_mode: dict[GatherModeName, list[Job]] = collections.defaultdict(list)
        for job in jobs:
            by_mode[job.item.mode].append(job)
        for mode, group in by_mode.items():
            pixels = torch.stack([job.pixels for job in group])  # type: ignore[misc]
            images = self._preprocessor.normalize(pixels.to(backbone.device, non_blocking=True))
            ks = sorted({k for job in group for k in job.item.unique_ks}) if mode == "mist" else []
            # The forward's thread count only around the forward: set per batch, since a CPU thread starting later
            # sets torch's process-wide count to 1, which the matrix products follow (measured: ViT-B/16 at half
            # speed on 2 cores); and 1 again after it, since the small ops around it lose more to OpenMP's
            # spinning teams than they gain (measured: 0.6 ms more CPU per image with a free forward).
            torch.set_num_threads(self._config.forward_threads)
            try:
                with backbone.autocast():
                    gathered = gather(backbone.model, images, mode, ks)
            finally:
                torch.set_num_threads(1)
            for k, tensor in gathered.items():
                wanting = [(row, job) for row, job in enumerate(group) if k in job.item.unique_ks]
                host_bytes += _to_host(tensor, wanting, k)
            self._metrics.forward_passes.labels(mode).inc()
        for job in jobs:
            job.pixels = None  # the batch's memory goes as soon as it is no longer needed
        return host_bytes

    def _encode_each(self, jobs: Sequence[Job], answers: list[ExtractResponse | None], chunk: Sequence[int]) -> None:
        for i in chunk:
            self._encode(jobs[i], answers, i)

    def _encode(self, job: Job, answers: list[ExtractResponse | None], i: int) -> None:
        """A CPU thread: compress each distinct k once, store it in the cache, answer in request order."""
        item = job.item
        codec, mode = self._codec(item.codec), mode_to_proto(item.mode)
        encoded: dict[int, feature_pb2.FeatureTensor] = {}
        for k in item.unique_ks:
            host = job.features[k]
            try:
                if host.quantized is not None:
                    message = codec.encode_quantized(
                        host.quantized,
                        host.scales,
                        outlier_columns=host.outlier_columns,
                        outlier_values=host.outlier_values,
                        backbone=self.backbone_id,
                        mode=mode,
                        k=k,
                    )
                else:
                    message = codec.encode(host.floats, backbone=self.backbone_id, mode=mode, k=k)
            except InvalidArgumentError as error:  # e.g. values beyond float16's range: this image, not the stream
                answers[i] = self._failed(
                    job,
                    feature_pb2.ItemError(
                        code=_GRPC_INVALID_ARGUMENT,
                        reason="unencodable_features",
                        message=f"features of k={k} cannot be encoded as {item.codec.name}: {error}",
                    ),
                )
                return
            encoded[k] = message
            if job.digest:
                self.cache.put(self._cache_key(item, job.digest, k), message.SerializeToString())
        job.features = {}
        features = [encoded[k] for k in item.ks]
        answers[i] = ExtractResponse(item_id=item.item_id, features=features, cache_hit=False)
        self._metrics.served(item.mode, item.codec.name, "ok", features)
        self._metrics.image_latency.observe(time.perf_counter() - job.admitted_at)

    def _codec(self, config: CodecConfig) -> FeatureCodec:
        codec = self._codecs.get(config)
        if codec is None:  # a benign race between threads builds two equal codecs
            codec = self._codecs[config] = FeatureCodec(config)
        return codec

    def _failed(self, job: Job, error: feature_pb2.ItemError) -> ExtractResponse:
        self._metrics.served(job.item.mode, job.item.codec.name, error.reason)
        self._metrics.image_latency.observe(time.perf_counter() - job.admitted_at)
        return ExtractResponse(item_id=job.item.item_id, error=error)

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

        While the window is full nothing more is read, so gRPC flow control pushes back on the sender; answers the
        consumer has not taken count in the window, so a slow reader slows its sender too. A request that fails
        validation stops the reading: the answers before it are still delivered, then its error ends the stream.
        With nothing in progress and no request for --stream-idle-timeout-s, the stream ends (DeadlineExceededError)
        so that a client which opens streams and sends nothing cannot hold the --max-streams slots.
        """
        with self._stream_slot():
            stream = OrderedStream(
                requests,
                self._admit,
                window=self._config.max_items_in_flight,
                idle_timeout_s=self.idle_timeout_s,
                idle_error=lambda: self.idle_error("request"),
                on_taken=self._metrics.items_in_flight.dec,
                on_abandoned=self._metrics.items_in_flight.dec,
            )
            async with contextlib.aclosing(stream.answers()) as answers:
                async for answer in answers:
                    yield answer

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


def _own_torch_threads(count: int) -> None:
    """Give the calling thread `count` torch intra-op threads.

    torch.set_num_threads sets the calling thread's OpenMP count and a process-wide value, and a thread's first
    parallel op re-reads the process-wide value (torch initialises each thread lazily): the op comes first, so that
    the forward's per-batch setting does not give the CPU threads its count too.
    """
    torch.ones(2).add_(1)  # this thread's lazy initialisation, from whatever the process-wide value is now
    torch.set_num_threads(count)


def _to_host(tensor: torch.Tensor, wanting: Sequence[tuple[int, Job]], k: int) -> int:
    """Copy the rows of one k's batch tensor that jobs want to the host: quantized on the device for i8 and i8o
    codecs (int8 values, scales and, for i8o, the few outlier columns), float32 for the others; each job gets its
    own row. Returns the bytes."""
    copied = 0
    for kind in ("i8", "i8o", "float"):
        chosen = [(row, job) for row, job in wanting if _host_kind(job.item.codec.dtype) == kind]
        if not chosen:
            continue
        rows = tensor if len(chosen) == tensor.shape[0] else tensor[[row for row, _ in chosen]]
        if kind == "i8o":
            batch = quantize_images_i8o(rows).to_host()
            copied += batch.nbytes()
            for (_, job), (quantized, scales, columns, values) in zip(chosen, batch.split(), strict=True):
                job.features[k] = HostFeatures(
                    quantized=quantized, scales=scales, outlier_columns=columns, outlier_values=values
                )
        elif kind == "i8":
            quantized, scales = quantize_rows_i8(rows)
            quantized_host, scales_host = quantized.cpu().numpy(), scales.cpu().numpy()
            copied += quantized_host.nbytes + scales_host.nbytes
            for n, (_, job) in enumerate(chosen):
                # [n, ...] keeps a 0-d array (not a numpy scalar) for one-vector modes such as cls
                job.features[k] = HostFeatures(quantized=quantized_host[n, ...], scales=scales_host[n, ...])
        else:
            floats = rows.float().cpu().numpy()
            copied += floats.nbytes
            for n, (_, job) in enumerate(chosen):
                job.features[k] = HostFeatures(floats=floats[n])
    return copied


def _host_kind(dtype: str) -> str:
    """How a codec's features leave the device: "i8" or "i8o" quantized there, "float" as float32."""
    return dtype if dtype in ("i8", "i8o") else "float"
