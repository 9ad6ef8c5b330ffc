"""Prometheus metrics of the extractor: traffic (images, bytes), batching, latency, cache, flow control, and what the
baselines would send for the loaded backbone. One `ExtractorMetrics` per server, on that server's own registry.

Names follow `mist_extractor_<what>_<unit>[_total]` in base units (bytes, seconds). The Grafana panel "bytes per
image actually sent vs LST/LAST" is computed from them:

    # bytes per image actually sent, per mode (features of every requested k count: that is what crossed the link)
    sum by (mode) (rate(mist_extractor_feature_bytes_sent_total[5m]))
      / sum by (mode) (rate(mist_extractor_images_served_total{status="ok"}[5m]))
    # next to what each method would send as float32 for the same backbone (lst, last, partial, cls, mist_f32;
    # stages, last_stage, mist_f32 on a hierarchical backbone)
    max by (method) (mist_extractor_baseline_bytes_per_image)
    # compression ratio of the codecs in use: float32 bytes the features stand for / bytes sent
    sum by (codec) (rate(mist_extractor_feature_float32_bytes_total[5m]))
      / sum by (codec) (rate(mist_extractor_feature_bytes_sent_total[5m]))
    # cache hit ratio (items)
    rate(mist_extractor_cache_hits_total[5m])
      / (rate(mist_extractor_cache_hits_total[5m]) + rate(mist_extractor_cache_misses_total[5m]))

Every metric is a plain Counter, Histogram or Gauge (each Gauge with its `multiprocess_mode`), so that with
`--workers N` the supervisor's /metrics adds up the workers' values; the cache's figures are copied from
FeatureCache.stats() after each answered image under --workers N, and at each scrape of a single process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from services.common.pb import feature_pb2
from services.common.wire.codec import encoded_nbytes, float32_nbytes
from services.extractor.batcher import BatchRecord
from services.extractor.cache import FeatureCache

PREFIX = "mist_extractor"
# Powers of two up to well past any sensible --max-batch-size.
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Queue waits sit around --max-queue-delay-ms (5 ms by default) and grow under overload.
_QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# One image, read to answered: cache hits in well under 1 ms; a forward on a busy CPU in seconds.
_IMAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# One forward: ~1 ms (tiny ViT, GPU) to seconds (ViT-B at batch 32 on a few CPU cores).
_FORWARD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ExtractorMetrics:
    """Every extractor metric, registered on `registry` (shared gRPC request metrics are added by the server)."""

    def __init__(self, registry: CollectorRegistry, prefix: str = PREFIX) -> None:
        p = prefix
        self._cache: FeatureCache | None = None
        self._cache_lock = threading.Lock()
        # Under --workers N (prometheus multiprocess mode) a scrape cannot reach a worker's cache, so each answered
        # image copies the cache's stats; a single process copies them at each scrape only.
        self._refresh_per_image = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self._served_children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}  # labelled children, per key
        self._evictions_seen = 0
        # Registered before the cache metrics, so a scrape refreshes them before it reads them.
        registry.register(_RefreshOnScrape(self.refresh_cache))
        self.images_served = Counter(
            f"{p}_images_served_total",
            "Images answered, by gather mode, codec and status ('ok' or the per-item error reason)",
            ["mode", "codec", "status"],
            registry=registry,
        )
        self.feature_bytes_sent = Counter(
            f"{p}_feature_bytes_sent_total",
            "Encoded feature bytes sent (serialized FeatureTensor messages)",
            ["mode", "codec"],
            registry=registry,
        )
        self.feature_float32_bytes = Counter(
            f"{p}_feature_float32_bytes_total",
            "Bytes the sent features would take as plain float32 (the paper's unit)",
            ["mode", "codec"],
            registry=registry,
        )
        self.image_bytes_received = Counter(
            f"{p}_image_bytes_received_total", "Image bytes received", registry=registry
        )
        self.batch_size = Histogram(
            f"{p}_batch_size_images",
            "Images per forward batch (across all streams)",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            f"{p}_queue_wait_seconds",
            "Time an image waited for its batch to start",
            buckets=_QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.forward_duration = Histogram(
            f"{p}_forward_duration_seconds",
            "Time one batch took in the backbone (every gather mode it held)",
            buckets=_FORWARD_BUCKETS,
            registry=registry,
        )
        self.forward_passes = Counter(
            f"{p}_forward_passes_total",
            "Backbone forward passes, by gather mode (a batch mixing modes runs one per mode)",
            ["mode"],
            registry=registry,
        )
        self.cache_hits = Counter(
            f"{p}_cache_hits_total",
            "Images answered from the cache (every requested k cached: no decode, no forward)",
            registry=registry,
        )
        self.cache_misses = Counter(
            f"{p}_cache_misses_total",
            "Images that needed a forward pass while the cache was enabled",
            registry=registry,
        )
        self.image_latency = Histogram(
            f"{p}_image_latency_seconds",
            "Time from reading an image off its stream to "
            "its answer being ready (decode, queue, forward, encode; or a cache hit)",
            buckets=_IMAGE_BUCKETS,
            registry=registry,
        )
        self.streams_ended_idle = Counter(
            f"{p}_streams_ended_idle_total",
            "Extract streams ended with "
            "DEADLINE_EXCEEDED after --stream-idle-timeout-s without progress: 'request' "
            "= the client sent nothing while nothing was in progress, 'response' = the "
            "client did not read an answer",
            ["waiting_for"],
            registry=registry,
        )
        # multiprocess_mode: how the supervisor of --workers N combines the workers' values (live ones only
        # for "live*": a dead worker's streams and cache are gone). Ignored by a single process.
        self.streams_in_flight = Gauge(
            f"{p}_streams_in_flight", "Extract streams open now", registry=registry, multiprocess_mode="livesum"
        )
        self.items_in_flight = Gauge(
            f"{p}_items_in_flight",
            "Images read from streams and not yet answered",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.baseline_bytes_per_image = Gauge(
            f"{p}_baseline_bytes_per_image",
            "Float32 bytes per image each method would send for the loaded backbone",
            ["method"],
            registry=registry,
            multiprocess_mode="max",  # the same constant in every worker
        )
        # Each worker has a cache of its own: the node holds the sum, bounded by the sum of the bounds.
        self.cache_evictions = Counter(
            f"{p}_cache_evictions", "Cache entries dropped to make room (LRU)", registry=registry
        )
        self.cache_bytes = Gauge(
            f"{p}_cache_bytes",
            "Encoded feature bytes held in the cache",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.cache_entries = Gauge(
            f"{p}_cache_entries",
            "Features held in the cache (one per image, mode, k, codec)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.cache_max_bytes = Gauge(
            f"{p}_cache_max_bytes",
            "The cache's size bound (0: disabled)",
            registry=registry,
            multiprocess_mode="livesum",
        )

    def watch_cache(self, cache: FeatureCache) -> None:
        """Export `cache`'s evictions and size (copied from its stats() by refresh_cache)."""
        with self._cache_lock:
            self._cache = cache
            self._evictions_seen = 0
        self.refresh_cache()

    def refresh_cache(self) -> None:
        """Copy the watched cache's stats into the cache metrics: after each answered image (the cache only changes
        before one is answered) and at each scrape of a single process. Cheap: one locked snapshot."""
        with self._cache_lock:
            if self._cache is None:
                return
            stats = self._cache.stats()
            evicted = stats.evictions - self._evictions_seen
            if evicted < 0:  # the cache was cleared and counts from 0 again
                evicted = stats.evictions
            if evicted:
                self.cache_evictions.inc(evicted)
            self._evictions_seen = stats.evictions
            self.cache_bytes.set(stats.bytes)
            self.cache_entries.set(stats.entries)
            self.cache_max_bytes.set(stats.max_bytes)

    def set_baselines(self, bytes_per_image: Mapping[str, int]) -> None:
        """One gauge value per method: {"lst": ..., "last": ..., "partial": ..., "cls": ..., "mist_f32": ...} for a ViT,
        {"stages": ..., "last_stage": ..., "mist_f32": ...} for a hierarchical backbone."""
        for method, size in bytes_per_image.items():
            self.baseline_bytes_per_image.labels(method).set(size)

    def observe_batch(self, record: BatchRecord) -> None:
        """The batcher's on_batch callback."""
        self.batch_size.observe(record.size)
        for wait in record.queue_wait_s:
            self.queue_wait.observe(wait)
        self.forward_duration.observe(record.run_s)

    def served(self, mode: str, codec: str, status: str, features: Iterable[feature_pb2.FeatureTensor] = ()) -> None:
        """One answered image: its status ('ok' or an error reason) and the features it carried."""
        key = (mode, codec, status)
        children = self._served_children.get(key)
        if children is None:  # labels() takes a lock and builds a tuple per call: once per key is enough
            children = self._served_children[key] = (
                self.images_served.labels(mode, codec, status),
                self.feature_bytes_sent.labels(mode, codec),
                self.feature_float32_bytes.labels(mode, codec),
            )
        images, bytes_sent, float32_bytes = children
        images.inc()
        sent = stands_for = 0
        for feature in features:
            sent += encoded_nbytes(feature)
            stands_for += float32_nbytes(feature)
        if sent:
            bytes_sent.inc(sent)
            float32_bytes.inc(stands_for)
        if self._refresh_per_image:
            self.refresh_cache()


class _RefreshOnScrape(Collector):
    """Exports nothing: runs `refresh` when a registry is collected, before the collectors registered after it."""

    def __init__(self, refresh: Callable[[], None]) -> None:
        self._refresh = refresh

    def describe(self) -> list[Metric]:
        return []  # so that registering it does not call collect()

    def collect(self) -> Iterator[Metric]:
        self._refresh()
        return iter(())
