"""Prometheus metrics of the registry (`mist_registry_*`, base units), next to the shared gRPC metrics.

Counters are updated by the servicer as calls finish; the gauges (bytes stored, versions per task, tasks,
aliases) are read from the store's stats() when Prometheus scrapes, so they are right however many
replicas write to one PostgreSQL database (aggregate them with max(), not sum(), across replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.errors import MistError
from services.common.serving.rpc import status_for
from services.registry.store import RegistryStore
from services.registry.watch import AliasFeed

log = logging.getLogger(__name__)


class RegistryMetrics:
    """The registry's own counters, plus a scrape-time collector of the store's gauges when a store is given."""

    def __init__(self, registry: CollectorRegistry, store: RegistryStore | None = None) -> None:
        # Calls refused before the handler (no or unknown token, draining) show in the shared gRPC metrics.
        self.pushes = Counter(
            "mist_registry_pushes_total", "PushVersion calls finished, by status code", ["code"], registry=registry
        )
        self.pulls = Counter(
            "mist_registry_pulls_total",
            "PullVersion calls finished, by status code (not_modified answers count as OK)",
            ["code"],
            registry=registry,
        )
        self.pulls_not_modified = Counter(
            "mist_registry_pulls_not_modified_total",
            "pulls answered with the header only because the client already had the blob",
            registry=registry,
        )
        self.pushed_bytes = Counter(
            "mist_registry_pushed_bytes_total",
            "blob bytes received by pushes, refused ones included",
            registry=registry,
        )
        self.pulled_bytes = Counter("mist_registry_pulled_bytes_total", "blob bytes sent by pulls", registry=registry)
        self.alias_moves = Counter(
            "mist_registry_alias_moves_total",
            "alias moves (set to another version, created or deleted), as recorded in alias history",
            registry=registry,
        )
        self.watches = Counter(
            "mist_registry_watches_total",
            "WatchAlias streams opened (devices reconnecting count again)",
            registry=registry,
        )
        self.watch_events = Counter(
            "mist_registry_watch_events_total", "alias events sent to watching devices", registry=registry
        )
        self.watchers = Gauge(
            "mist_registry_watchers",
            "WatchAlias streams open on this replica (sum over replicas: every replica counts its own)",
            registry=registry,
        )
        if store is not None:
            registry.register(StoreCollector(store))

    def count_watchers(self, feed: AliasFeed) -> None:
        """mist_registry_watchers reads the feed at scrape time."""
        self.watchers.set_function(lambda: feed.watchers)

    @contextlib.contextmanager
    def outcome(self, counter: Counter) -> Iterator[None]:
        """Counts one call under the status code it ends with (a domain error's code, CANCELLED, INTERNAL)."""
        code = "OK"
        try:
            yield
        except MistError as error:
            code = status_for(error).name
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the client went away mid-stream
            code = "CANCELLED"
            raise
        except BaseException:
            code = "INTERNAL"
            raise
        finally:
            counter.labels(code).inc()


class StoreCollector(Collector):
    """Gauges read from RegistryStore.stats() at scrape time; a failing store reports up = 0 and no gauges."""

    def __init__(self, store: RegistryStore) -> None:
        self._store = store

    def describe(self) -> list[GaugeMetricFamily]:
        # Without describe(), registering the collector would run a database query at startup.
        return [self._up(1)]

    def _up(self, value: int) -> GaugeMetricFamily:
        return GaugeMetricFamily("mist_registry_store_up", "1 when the last scrape could read the store", value)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            stats = self._store.stats()
        except MistError as error:  # e.g. PostgreSQL down: the scrape still answers, and says so
            log.warning("metrics scrape could not read the registry store: %s", error)
            yield self._up(0)
            return
        yield self._up(1)
        yield GaugeMetricFamily("mist_registry_stored_bytes", "bytes of live version blobs", stats.bytes_stored)
        yield GaugeMetricFamily("mist_registry_tasks", "tasks in the registry", stats.tasks)
        yield GaugeMetricFamily("mist_registry_aliases", "aliases over all tasks", stats.aliases)
        versions = GaugeMetricFamily("mist_registry_versions", "live versions per task", labels=["task"])
        for task, count in stats.versions_by_task.items():
            versions.add_metric([task], count)
        yield versions
        devices = GaugeMetricFamily(
            "mist_registry_fleet_devices",
            "devices whose last report names this version (state: fresh, or stale after 90 s of silence)",
            labels=["task", "version", "state"],
        )
        for (task, version, state), count in sorted(stats.devices.items()):
            devices.add_metric([task, str(version), state], count)
        yield devices
        rollout = GaugeMetricFamily(
            "mist_registry_rollout_percent",
            "share of the task's devices a staged rollout reaches (absent: none in progress)",
            labels=["task", "alias", "version"],
        )
        for (task, alias), (version, percent) in sorted(stats.rollouts.items()):
            rollout.add_metric([task, alias, str(version)], percent)
        yield rollout
