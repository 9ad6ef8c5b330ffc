"""The Tuner gRPC servicer: the worker's Tune and Predict run the same functions as `mist tune` / `mist predict`
(services/tuner/tune.py, predict.py) on a thread each, and stream what they report back to the caller.

Stateless by construction: every call opens its own connections, holds its images and features in memory only,
and leaves nothing behind; a call that ends early (client gone, worker draining or killed) stops its job before the
push, so the registry never sees a partial version. Domain errors map to status codes through `handles_errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from services.common.clients.extractor import BackboneInfo, ImageItem
from services.common.errors import InvalidArgumentError, ResourceExhaustedError
from services.common.pb import registry_pb2, tuner_pb2, tuner_pb2_grpc
from services.common.serving.rpc import handles_errors, status_for
from services.common.wire.codec import CodecConfig
from services.common.wire.edge_spec import POOLINGS
from services.registry.serde import version_to_proto
from services.tuner.config import Endpoints, TunerConfig
from services.tuner.data import Split, dataset_from_memory
from services.tuner.metrics import JobKind, TunerMetrics
from services.tuner.predict import DEFAULT_TOP_K, Prediction, load_version, predict_images
from services.tuner.reports import TuneObserver, TuneResult
from services.tuner.training import EpochStats, KSelection, StepProgress
from services.tuner.tune import TuneOptions, find_task, tune_dataset, tuner_identity

SERVICE_NAME = tuner_pb2.DESCRIPTOR.services_by_name["Tuner"].full_name  # "mist.v1.Tuner"
_SPLITS: dict[int, Split | None] = {tuner_pb2.SPLIT_UNSPECIFIED: None, tuner_pb2.SPLIT_TRAIN: "train",
                                    tuner_pb2.SPLIT_VAL: "val", tuner_pb2.SPLIT_TEST: "test"}  # fmt: skip
_STATUS_CODES = {status.name: status.value[0] for status in grpc.StatusCode}
_OPTION_DEFAULTS = {field.name: field.default for field in dataclasses.fields(TuneOptions)}
_MAX_TOP_K = 1000
_POLL_S = 0.1  # how often a blocked job thread looks whether its call is gone
_END = object()


class JobCancelled(Exception):
    """The call this job serves is gone; the job stops before anything is pushed."""


class _Channel:
    """Messages from a job's thread to its RPC coroutine, in order; `cancelled` goes the other way."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()

    def put(self, kind: str, value: Any = None) -> None:
        """From any thread; dropped when the server's loop is already gone (a job outliving a shutdown)."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))

    async def get(self) -> tuple[str, Any]:
        return await self._queue.get()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled("the call ended before the job finished")


def _run_in_thread(name: str, job: Callable[[], Any], channel: _Channel, on_exit: Callable[[], None]) -> None:
    """Run `job` on a daemon thread; its return value arrives as ("done", value), an exception as ("error", e)."""

    def body() -> None:
        try:
            channel.put("done", job())
        except BaseException as error:  # handed to the RPC, which maps it to a status
            channel.put("error", error)
        finally:
            on_exit()

    threading.Thread(target=body, name=name, daemon=True).start()


# ---------------------------------------------------------------------------------------------- Tune


def options_from_spec(spec: tuner_pb2.TuneSpec, tuner: str) -> TuneOptions:
    """TuneOptions from a TuneSpec: zero numbers and empty strings mean "the default" (proto3 has no unset)."""
    edge = spec.edge
    if edge.pooling and edge.pooling not in POOLINGS:
        raise InvalidArgumentError(f"edge.pooling must be one of {POOLINGS}, got {edge.pooling!r}")
    defaults = _OPTION_DEFAULTS
    return TuneOptions(
        task=spec.task, k=spec.k or None,
        codec=CodecConfig.from_proto(spec.codec).name if spec.HasField("codec") else None,
        epochs=spec.epochs or defaults["epochs"], batch_size=spec.batch_size or defaults["batch_size"],
        lr=spec.lr or defaults["lr"], weight_decay=spec.weight_decay or defaults["weight_decay"],
        warmup_epochs=spec.warmup_epochs or None, seed=spec.seed,
        val_fraction=spec.val_fraction or defaults["val_fraction"],
        num_blocks=edge.num_blocks or None, rank=edge.rank or None, heads=edge.heads or None,
        pooling=edge.pooling or None, alias=spec.alias or None, description=spec.description, force=spec.force,
        skip_unreadable=spec.skip_unreadable,
        tuner=tuner,
    )  # fmt: skip


class _TuneObserver(TuneObserver):
    """Turns pipeline hooks into TuneEvents and metrics; raises JobCancelled once the call is gone."""

    def __init__(self, channel: _Channel, metrics: TunerMetrics, train_images: int) -> None:
        self._channel, self._metrics, self._train_images = channel, metrics, train_images
        self._baselines: dict[str, int] = {}
        self._extraction_tenth = -1
        self._last_step = time.perf_counter()

    def _event(self, **fields: Any) -> None:
        self._channel.check()
        self._channel.put("event", tuner_pb2.TuneEvent(**fields))

    def on_backbone(self, info: BackboneInfo) -> None:
        self._baselines = dict(info.baselines)
        for method, size in self._baselines.items():
            self._metrics.baseline_bytes_per_image.labels(method).set(size)

    def on_extraction(self, done: int, total: int, feature_bytes: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth == self._extraction_tenth and done < total:
            self._channel.check()
            return  # one event per 10 %: a progress stream, not a copy of every answer
        self._extraction_tenth = tenth
        self._event(
            extraction=tuner_pb2.ExtractionProgress(
                done=done,
                total=total,
                feature_bytes=feature_bytes,
                bytes_per_image=feature_bytes / max(done, 1),
                lst_bytes_per_image=self._baselines.get("lst", 0),
                last_bytes_per_image=self._baselines.get("last", 0),
            )
        )

    def on_step(self, progress: StepProgress) -> None:
        now = time.perf_counter()
        self._metrics.step_seconds.labels(progress.phase).observe(now - self._last_step)
        self._last_step = now
        self._channel.check()

    def on_epoch(self, stats: EpochStats) -> None:
        self._metrics.images_trained.labels(stats.phase).inc(self._train_images)
        self._event(
            epoch=tuner_pb2.EpochProgress(
                k=stats.k,
                epoch=stats.epoch,
                epochs=stats.epochs,
                train_loss=stats.train_loss,
                train_accuracy=stats.train_accuracy,
                val_accuracy=stats.val_accuracy or 0.0,
                images_per_second=stats.images_per_second,
                phase=stats.phase,
            )
        )
        self._last_step = time.perf_counter()  # validation ran since the last step: not step time

    def on_k_selection(self, selection: KSelection) -> None:
        self._event(
            k_selection=tuner_pb2.KSelection(chosen_k=selection.chosen_k, val_accuracy_by_k=selection.val_accuracy_by_k)
        )

    def message(self, text: str) -> None:
        self._event(log=text)

    def before_push(self) -> None:
        self._channel.check()


class _Limits:
    """What one Tune call may send, counted as the images arrive."""

    def __init__(self, max_images: int, max_bytes: int) -> None:
        self.max_images, self.max_bytes = max_images, max_bytes
        self.images = self.bytes = 0

    def add(self, image: tuner_pb2.LabelledImage) -> None:
        self.images += 1
        self.bytes += len(image.image)
        if self.images > self.max_images or self.bytes > self.max_bytes:
            raise ResourceExhaustedError(
                f"a Tune call may send at most {self.max_images} images and "
                f"{self.max_bytes} bytes of images to this worker (--max-tune-images, "
                "--max-tune-bytes); tune on the device or split the data"
            )


async def _receive_images(
    requests: AsyncIterator[tuner_pb2.TuneRequest], limits: _Limits
) -> list[tuple[str, bytes, str, Split | None]]:
    records = []
    async for request in requests:
        if request.WhichOneof("part") != "image":
            raise InvalidArgumentError("a Tune call sends one TuneSpec, first; every later message is an image")
        image = request.image
        limits.add(image)
        if image.split not in _SPLITS:
            raise InvalidArgumentError(f"image {image.item_id!r}: unknown split {image.split}")
        records.append((image.item_id or f"#{len(records)}", image.image, image.label, _SPLITS[image.split]))
    return records


def _tune_job(
    endpoints: Endpoints,
    spec: tuner_pb2.TuneSpec,
    options: TuneOptions,
    records: list[tuple[str, bytes, str, Split | None]],
    channel: _Channel,
    metrics: TunerMetrics,
) -> TuneResult:
    with endpoints.extractor_client() as extractor, endpoints.registry_client(use_cache_dir=False) as registry:
        task = find_task(registry, spec.task)
        classes = tuple(spec.class_names) or (tuple(task.class_names) if task else None)
        dataset = dataset_from_memory(
            records, class_names=classes, val_fraction=options.val_fraction, seed=options.seed
        )
        records.clear()  # the dataset holds the bytes now
        observer = _TuneObserver(channel, metrics, len(dataset.indices("train")))
        result = tune_dataset(dataset, options, extractor, registry, observer, task=task)
    metrics.feature_bytes.labels("tune").inc(result.extraction.feature_bytes)
    metrics.feature_images.labels("tune").inc(result.extraction.images)
    metrics.bytes_per_image.observe(result.transfer.bytes_per_image)
    return result


# ---------------------------------------------------------------------------------------------- Predict


def _prediction_to_proto(prediction: Prediction) -> tuner_pb2.PredictResponse:
    response = tuner_pb2.PredictResponse(item_id=prediction.item_id, version=prediction.version)
    if not prediction.ok:
        response.error.code = _STATUS_CODES.get(prediction.error_code, grpc.StatusCode.UNKNOWN.value[0])
        response.error.reason, response.error.message = prediction.error_reason, prediction.error_message
        return response
    response.label, response.probability = prediction.label, prediction.probability
    response.top.extend(tuner_pb2.ClassScore(label=label, probability=p) for label, p in prediction.top)
    return response


def _ref(ref: registry_pb2.VersionRef) -> tuple[int | None, str | None]:
    which = ref.WhichOneof("ref")
    if which == "number":
        return ref.number, None
    if which == "alias":
        return None, ref.alias
    return None, None  # latest


def _items(inbox: queue.Queue, cancelled: threading.Event) -> Iterator[ImageItem]:
    """The images the RPC hands over, until its end marker (or the call is gone)."""
    while not cancelled.is_set():
        try:
            item = inbox.get(timeout=_POLL_S)
        except queue.Empty:
            continue
        if item is _END:
            return
        yield item


def _put(inbox: queue.Queue, item: object, cancelled: threading.Event) -> None:
    while not cancelled.is_set():
        with contextlib.suppress(queue.Full):
            inbox.put(item, timeout=_POLL_S)
            return


# ---------------------------------------------------------------------------------------------- the servicer


class TunerServicer(tuner_pb2_grpc.TunerServicer):
    """Tune and Predict; see the module docstring."""

    def __init__(self, config: TunerConfig, metrics: TunerMetrics, *, endpoints: Endpoints | None = None) -> None:
        self._config = config
        self._metrics = metrics
        self._endpoints = endpoints or config.endpoints()
        self._slots = threading.BoundedSemaphore(config.max_concurrent_jobs)
        self._tuner = tuner_identity("worker")

    def _finished(self, kind: JobKind, error: BaseException | None) -> None:
        if error is None:
            outcome = "OK"
        elif isinstance(error, (JobCancelled, asyncio.CancelledError, GeneratorExit)):
            outcome = "CANCELLED"
        else:
            outcome = status_for(error).name
        self._metrics.jobs.labels(kind, outcome).inc()

    @handles_errors
    async def Tune(
        self, request_iterator: AsyncIterator[tuner_pb2.TuneRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tuner_pb2.TuneEvent]:
        error: BaseException | None = None
        channel: _Channel | None = None
        try:
            spec = await _first(request_iterator, "spec", "TuneSpec")
            options = options_from_spec(spec, self._tuner)
            if not self._slots.acquire(blocking=False):
                raise ResourceExhaustedError(
                    f"this worker is busy with {self._config.max_concurrent_jobs} tune "
                    "job(s) (--max-concurrent-jobs); retry on another replica or later"
                )
            channel = _Channel()
            self._metrics.jobs_running.labels("tune").inc()
            try:
                records = await _receive_images(
                    request_iterator, _Limits(self._config.max_tune_images, self._config.max_tune_bytes)
                )
            except BaseException:
                self._release("tune")
                raise
            _run_in_thread(
                "tune-job",
                lambda: _tune_job(self._endpoints, spec, options, records, channel, self._metrics),
                channel,
                lambda: self._release("tune"),
            )
            async for event in _events(channel):
                yield event
        except BaseException as e:
            error = e
            raise
        finally:
            if channel is not None:
                channel.cancelled.set()  # a job still running stops at its next hook, before any push
            self._finished("tune", error)

    def _release(self, kind: JobKind) -> None:
        self._metrics.jobs_running.labels(kind).dec()
        if kind == "tune":
            self._slots.release()

    @handles_errors
    async def Predict(
        self, request_iterator: AsyncIterator[tuner_pb2.PredictRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tuner_pb2.PredictResponse]:
        error: BaseException | None = None
        channel: _Channel | None = None
        feeder: asyncio.Task | None = None
        try:
            spec = await _first(request_iterator, "spec", "PredictSpec")
            top_k = spec.top_k or DEFAULT_TOP_K
            if not spec.task or top_k > _MAX_TOP_K:
                raise InvalidArgumentError(f"a PredictSpec needs a task and top_k <= {_MAX_TOP_K}")
            channel, inbox = _Channel(), queue.Queue(maxsize=2 * self._config.max_in_flight)
            self._metrics.jobs_running.labels("predict").inc()
            _run_in_thread(
                "predict-job",
                lambda: self._predict_job(spec, top_k, inbox, channel),
                channel,
                lambda: self._release("predict"),
            )
            feeder = asyncio.ensure_future(_feed(request_iterator, inbox, channel))
            async for response in _events(channel, kind="prediction"):
                yield _prediction_to_proto(response)
        except BaseException as e:
            error = e
            raise
        finally:
            if channel is not None:
                channel.cancelled.set()
            if feeder is not None:
                feeder.cancel()
            self._finished("predict", error)

    def _predict_job(self, spec: tuner_pb2.PredictSpec, top_k: int, inbox: queue.Queue, channel: _Channel) -> None:
        version, alias = _ref(spec.ref)
        with (
            self._endpoints.extractor_client() as extractor,
            self._endpoints.registry_client(use_cache_dir=False) as registry,
        ):
            loaded = load_version(
                registry, spec.task, version=version, alias=alias, runtime=self._config.predict_runtime
            )
            for prediction in predict_images(
                loaded,
                extractor,
                _items(inbox, channel.cancelled),
                top_k=top_k,
                max_in_flight=self._config.max_in_flight,
            ):
                self._metrics.predictions.labels("ok" if prediction.ok else "error").inc()
                if prediction.ok:
                    self._metrics.feature_bytes.labels("predict").inc(prediction.feature_bytes)
                    self._metrics.feature_images.labels("predict").inc()
                channel.put("prediction", prediction)
        channel.check()  # the items stopped because the call is gone, not because they ended


async def _first(requests: AsyncIterator[Any], field: str, what: str) -> Any:
    """The first message's `field`, which must be set: a stream starts with its spec."""
    first = await anext(requests, None)
    if first is None or first.WhichOneof("part") != field:
        raise InvalidArgumentError(f"the first message of the call must be its {what}")
    return getattr(first, field)


async def _feed(requests: AsyncIterator[tuner_pb2.PredictRequest], inbox: queue.Queue, channel: _Channel) -> None:
    """Hand the call's images to the predict thread; a malformed message fails the call."""
    try:
        async for request in requests:
            if request.WhichOneof("part") != "item":
                raise InvalidArgumentError(
                    "a Predict call sends one PredictSpec, first; every later message is an item"
                )
            item = ImageItem(request.item.item_id, request.item.image)
            await asyncio.to_thread(_put, inbox, item, channel.cancelled)
        await asyncio.to_thread(_put, inbox, _END, channel.cancelled)
    except asyncio.CancelledError:
        raise
    except Exception as error:
        channel.put("error", error)


async def _events(channel: _Channel, kind: str = "event") -> AsyncIterator[Any]:
    """The job's messages of `kind` until it is done; its exception, if it failed, is raised here."""
    while True:
        got, value = await channel.get()
        if got == kind:
            yield value
        elif got == "error":
            raise value
        elif got == "done":
            if isinstance(value, TuneResult):
                yield tuner_pb2.TuneEvent(result=version_to_proto(value.version))
            return
