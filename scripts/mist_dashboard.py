"""The "mist overview" Grafana dashboard, defined in code with grafana-foundation-sdk (Grafana 11.6 schema): the
transfer headline (bytes per image actually sent vs LST, LAST, Partial-1, linear probing and uncompressed MIST),
then the extractor, the tuner and the registry.

    .venv/bin/python scripts/build_monitoring.py          # writes deploy/grafana/mist-overview.json (+ k8s copy)

Every query goes through the helpers below, so each one carries the `$namespace` filter and rates over Grafana's
`$__rate_interval`; tests/integration/test_observability.py runs every one against a real Prometheus.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from grafana_foundation_sdk.builders import bargauge, heatmap, stat, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import prometheus as prometheus_builders
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common, dashboard
from grafana_foundation_sdk.models import prometheus as prometheus_models

UID = "mist-overview"
TITLE = "mist overview"
# Grafana template variables the queries use; the test substitutes concrete values for them.
RATE_INTERVAL = "$__rate_interval"
NAMESPACE_MATCHER = 'namespace=~"$namespace"'
DATASOURCE = dashboard.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Units (Grafana unit ids; "suffix:" ones are custom and render as a number followed by the text).
BYTES, BYTES_PER_S, SECONDS, RATIO, COUNT, CALLS_PER_S = "bytes", "Bps", "s", "percentunit", "short", "reqps"
TIMES, IMAGES_PER_S, PER_SECOND, PER_HOUR = "suffix:×", "suffix: img/s", "suffix: /s", "suffix: /h"
# The scrape jobs of the three services: the Service names, which ServiceMonitors use as the job label.
JOBS = '"mist-(extractor|registry|tuner)"'
QUANTILES = (0.5, 0.95, 0.99)

Panel = Any  # a grafana_foundation_sdk panel builder (timeseries, stat, bargauge, heatmap)


# ---------------------------------------------------------------------------------------------- PromQL


def eq(label: str, value: str) -> str:
    return f'{label}="{value}"'


def sel(metric: str, *matchers: str) -> str:
    """`metric{namespace=~"$namespace", matchers...}`."""
    return f"{metric}{{{', '.join((NAMESPACE_MATCHER, *matchers))}}}"


def rate(metric: str, *matchers: str) -> str:
    return f"rate({sel(metric, *matchers)}[{RATE_INTERVAL}])"


def sum_rate(metric: str, *matchers: str, by: Sequence[str] = ()) -> str:
    grouping = f" by ({', '.join(by)})" if by else ""
    return f"sum{grouping} ({rate(metric, *matchers)})"


def quantile(q: float, histogram: str, by: Sequence[str] = ()) -> str:
    """The q-quantile of a histogram's observations over the rate interval."""
    return f"histogram_quantile({q}, {sum_rate(histogram + '_bucket', by=(*by, 'le'))})"


def ratio(numerator: str, denominator: str) -> str:
    # `> 0` drops series with no traffic in the window: "no data" instead of a NaN from 0 / 0.
    return f"{numerator}\n  / ({denominator} > 0)"


def sent_per_image(*matchers: str, by: Sequence[str] = ()) -> str:
    """Encoded feature bytes sent per image answered "ok" (features of every requested k count)."""
    return ratio(
        sum_rate("mist_extractor_feature_bytes_sent_total", *matchers, by=by),
        sum_rate("mist_extractor_images_served_total", *matchers, eq("status", "ok"), by=by),
    )


def baseline(method: str) -> str:
    """What `method` would send per image as float32 for the loaded backbone (the same on every replica)."""
    return f"max({sel('mist_extractor_baseline_bytes_per_image', eq('method', method))})"


MIST_SENT_PER_IMAGE = sent_per_image(eq("mode", "mist"))


# ---------------------------------------------------------------------------------------------- panels


def query(expr: str, legend: str = "", *, instant: bool = False) -> prometheus_builders.Dataquery:
    built = prometheus_builders.Dataquery().expr(expr).datasource(DATASOURCE)
    if legend:
        built = built.legend_format(legend)
    return built.instant() if instant else built.range()


def _finish(
    panel: Panel,
    title: str,
    description: str,
    unit: str,
    queries: Sequence[prometheus_builders.Dataquery],
    width: int,
    height: int,
) -> Panel:
    if not 1 <= len(queries) <= len(string.ascii_uppercase):
        raise ValueError(f"panel {title!r} needs 1 to 26 queries, got {len(queries)}")
    panel = panel.title(title).description(description).unit(unit).datasource(DATASOURCE).span(width).height(height)
    for ref_id, target in zip(string.ascii_uppercase, queries, strict=False):
        panel = panel.with_target(target.ref_id(ref_id))
    return panel


def graph(
    title: str,
    description: str,
    unit: str,
    *queries: prometheus_builders.Dataquery,
    width: int = 8,
    height: int = 8,
    log_scale: bool = False,
) -> timeseries.Panel:
    """A time series panel; `log_scale` for series spanning decades (128 B for cls to megabytes for LST)."""
    panel = timeseries.Panel().legend(
        common_builders.VizLegendOptions()
        .show_legend(True)
        .display_mode(common.LegendDisplayMode.LIST)
        .placement(common.LegendPlacement.BOTTOM)
    )
    if log_scale:
        panel = panel.scale_distribution(
            common_builders.ScaleDistributionConfig().type(common.ScaleDistribution.LOG).log(10)
        )
    else:
        panel = panel.min(0)  # every quantity here is non-negative: keep the zero line in view
    return _finish(panel, title, description, unit, queries, width, height)


def big_number(
    title: str, description: str, unit: str, expr: str, *, decimals: int = 1, width: int = 4, height: int = 5
) -> stat.Panel:
    panel = (
        stat.Panel()
        .decimals(decimals)
        .graph_mode(common.BigValueGraphMode.AREA)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    return _finish(panel, title, description, unit, [query(expr)], width, height)


def bars(
    title: str, description: str, unit: str, *queries: prometheus_builders.Dataquery, width: int = 8, height: int = 9
) -> bargauge.Panel:
    panel = (
        bargauge.Panel()
        .orientation(common.VizOrientation.HORIZONTAL)
        .display_mode(common.BarGaugeDisplayMode.BASIC)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    return _finish(panel, title, description, unit, queries, width, height)


def distribution(
    title: str, description: str, bucket_unit: str, histogram: str, *, width: int = 8, height: int = 8
) -> heatmap.Panel:
    """A heatmap of a histogram's buckets per second (already bucketed by Prometheus: Grafana does not re-bin)."""
    bucket_query = query(sum_rate(histogram + "_bucket", by=("le",)), "{{le}}").format(
        prometheus_models.PromQueryFormat.HEATMAP
    )
    panel = heatmap.Panel().calculate(False).y_axis(heatmap.YAxisConfig().unit(bucket_unit)).show_legend()
    return _finish(panel, title, description, PER_SECOND, [bucket_query], width, height)


def quantiles(histogram: str, label: str, by: Sequence[str] = ()) -> list[prometheus_builders.Dataquery]:
    suffix = "".join(f" {{{{{name}}}}}" for name in by)
    return [query(quantile(q, histogram, by), f"{label} p{round(q * 100)}{suffix}") for q in QUANTILES]


# ---------------------------------------------------------------------------------------------- rows


def transfer_row() -> list[Panel]:
    """The headline: what crosses the link per image, against what the other methods would send."""
    sent_by_mode = sent_per_image(by=("mode", "codec"))
    baselines = f"max by (method) ({sel('mist_extractor_baseline_bytes_per_image')})"
    return [
        big_number(
            "× smaller than LST",
            "What LST would send per image (x_0 and every block output, float32) "
            "over the MIST bytes actually sent per image, all codecs.",
            TIMES,
            ratio(baseline("lst"), f"({MIST_SENT_PER_IMAGE})"),
        ),
        big_number(
            "× smaller than LAST",
            "What LAST would send per image (x_0 and every other block output, "
            "float32) over the MIST bytes actually sent per image.",
            TIMES,
            ratio(baseline("last"), f"({MIST_SENT_PER_IMAGE})"),
        ),
        big_number(
            "MIST bytes per image",
            "Encoded feature bytes sent per MIST image (every requested k counts), all codecs.",
            BYTES,
            MIST_SENT_PER_IMAGE,
            decimals=0,
        ),
        big_number(
            "Share of uncompressed MIST",
            "MIST bytes per image over one float32 [T, D] map (mist_f32): "
            "what the codecs save. Above 100%: f32 or several k per image.",
            RATIO,
            ratio(f"({MIST_SENT_PER_IMAGE})", baseline("mist_f32")),
        ),
        big_number(
            "× smaller than Partial-1",
            "What Partial-1 would send per image (the last block's input, float32) over the MIST bytes actually sent.",
            TIMES,
            ratio(baseline("partial"), f"({MIST_SENT_PER_IMAGE})"),
        ),
        big_number(
            "Feature traffic",
            "Encoded feature bytes sent per second, every mode and codec.",
            BYTES_PER_S,
            sum_rate("mist_extractor_feature_bytes_sent_total"),
            decimals=0,
        ),
        graph(
            "Bytes per image: sent vs baselines",
            "Solid: bytes per image actually sent, by gather mode and "
            "codec. Flat: float32 bytes per image each method would send for this backbone (lst, last, "
            "partial = Partial-1, cls = linear probing, mist_f32 = uncompressed MIST).",
            BYTES,
            query(sent_by_mode, "sent {{mode}} {{codec}}"),
            query(baselines, "{{method}} (float32)"),
            width=16,
            height=9,
            log_scale=True,
        ),
        bars(
            "Per image now: sent vs baselines",
            "The same comparison at the end of the range.",
            BYTES,
            query(sent_per_image(eq("mode", "mist"), by=("codec",)), "MIST {{codec}}", instant=True),
            query(baselines, "{{method}}", instant=True),
            width=8,
            height=9,
        ),
        graph(
            "Codec compression ratio",
            "Float32 bytes the sent features stand for over the bytes sent, by "
            "codec (independent of how many k each image asked for).",
            TIMES,
            query(
                ratio(
                    sum_rate("mist_extractor_feature_float32_bytes_total", by=("codec",)),
                    sum_rate("mist_extractor_feature_bytes_sent_total", by=("codec",)),
                ),
                "{{codec}}",
            ),
            width=12,
            height=7,
        ),
        graph(
            "Feature bytes sent per second",
            "By gather mode and codec.",
            BYTES_PER_S,
            query(sum_rate("mist_extractor_feature_bytes_sent_total", by=("mode", "codec")), "{{mode}} {{codec}}"),
            width=12,
            height=7,
        ),
    ]


def extractor_row() -> list[Panel]:
    hits, misses = sum_rate("mist_extractor_cache_hits_total"), sum_rate("mist_extractor_cache_misses_total")
    return [
        graph(
            "Images per second",
            "Images answered, by gather mode, codec and status ('ok' or the per-item error reason).",
            IMAGES_PER_S,
            query(
                sum_rate("mist_extractor_images_served_total", by=("mode", "codec", "status")),
                "{{mode}} {{codec}} {{status}}",
            ),
        ),
        graph(
            "Image latency p50 / p95 / p99",
            "Time from reading an image off its stream to its answer being "
            "ready: decode, queue wait, forward and encode, or a cache hit.",
            SECONDS,
            *quantiles("mist_extractor_image_latency_seconds", "image"),
        ),
        graph(
            "Queue wait and forward pass",
            "Time an image waited for its batch to start, and time one batch took in the backbone.",
            SECONDS,
            *quantiles("mist_extractor_queue_wait_seconds", "queue wait"),
            *quantiles("mist_extractor_forward_duration_seconds", "forward"),
        ),
        distribution(
            "Batch size distribution",
            "Forward batches per second by size (images across all "
            "streams); mostly 1 means the batcher waits for nothing: raise --max-queue-delay-ms.",
            COUNT,
            "mist_extractor_batch_size_images",
        ),
        graph(
            "Cache hit ratio",
            "Images answered from the cache over images looked up (cache enabled).",
            RATIO,
            query(ratio(hits, f"({hits} + {misses})"), "hit ratio"),
        ),
        graph(
            "Cache size",
            "Encoded feature bytes held in the cache, and its bound (--cache-max-bytes).",
            BYTES,
            query(f"sum({sel('mist_extractor_cache_bytes')})", "held"),
            query(f"sum({sel('mist_extractor_cache_max_bytes')})", "bound"),
        ),
        graph(
            "Streams and images in flight",
            "Extract streams open, and images read from them and not yet answered (the HPA's scaling metric).",
            COUNT,
            query(f"sum({sel('mist_extractor_streams_in_flight')})", "streams"),
            query(f"sum({sel('mist_extractor_items_in_flight')})", "images"),
        ),
        graph(
            "Failed calls by code",
            "Extractor gRPC calls that ended with a status other than OK, by method "
            "and status code (docs/reference/errors.md says what each code means).",
            CALLS_PER_S,
            query(
                sum_rate("mist_extractor_grpc_requests_total", 'code!="OK"', by=("method", "code")),
                "{{method}} {{code}}",
            ),
            width=8,
        ),
        graph(
            "Per-item errors by reason",
            "Images answered with an error inside a stream that went on (undecodable, too large, ...).",
            IMAGES_PER_S,
            query(sum_rate("mist_extractor_images_served_total", 'status!="ok"', by=("status",)), "{{status}}"),
            width=8,
        ),
    ]


def tuner_row() -> list[Panel]:
    received = ratio(
        sum_rate("mist_tuner_feature_bytes_received_total", by=("kind",)),
        sum_rate("mist_tuner_feature_images_received_total", by=("kind",)),
    )
    return [
        graph(
            "Jobs by outcome",
            "Tune and Predict calls finished per hour, by kind and outcome (a status code name).",
            PER_HOUR,
            query(f"{sum_rate('mist_tuner_jobs_total', by=('kind', 'outcome'))} * 3600", "{{kind}} {{outcome}}"),
        ),
        graph(
            "Bytes per image received by the tuners",
            "Feature bytes per image the workers received from "
            "the extractor, next to what each method would send (float32).",
            BYTES,
            query(received, "received ({{kind}})"),
            query(f"max by (method) ({sel('mist_tuner_baseline_bytes_per_image')})", "{{method}} (float32)"),
            log_scale=True,
        ),
        graph(
            "Training step time",
            "Wall time of one optimizer step (decoding the batch included), by phase.",
            SECONDS,
            *quantiles("mist_tuner_train_step_duration_seconds", "step", by=("phase",)),
        ),
        graph(
            "Jobs running",
            "Tune and Predict calls being worked on.",
            COUNT,
            query(f"sum by (kind) ({sel('mist_tuner_jobs_running')})", "{{kind}}"),
        ),
        graph(
            "Training images per second",
            "Training images processed (each epoch counts every image).",
            IMAGES_PER_S,
            query(sum_rate("mist_tuner_images_trained_total", by=("phase",)), "{{phase}}"),
        ),
        graph(
            "Predictions by outcome",
            "Images answered by Predict.",
            IMAGES_PER_S,
            query(sum_rate("mist_tuner_predictions_total", by=("outcome",)), "{{outcome}}"),
        ),
    ]


def registry_row() -> list[Panel]:
    return [
        graph(
            "Pushes and pulls by status",
            "Registry PushVersion and PullVersion calls finished, by status "
            "code (ABORTED on push: the parent was not the latest version).",
            CALLS_PER_S,
            query(sum_rate("mist_registry_pushes_total", by=("code",)), "push {{code}}"),
            query(sum_rate("mist_registry_pulls_total", by=("code",)), "pull {{code}}"),
        ),
        graph(
            "Versions per task",
            "Live versions of each task (read from the store: max over replicas).",
            COUNT,
            query(f"max by (task) ({sel('mist_registry_versions')})", "{{task}}"),
        ),
        graph(
            "Alias moves",
            "Aliases set to another version, created or deleted, per hour (rollbacks included).",
            PER_HOUR,
            query(f"{sum_rate('mist_registry_alias_moves_total')} * 3600", "moves"),
        ),
        graph(
            "Weights traffic",
            "Blob bytes received by pushes (refused ones included) and sent by pulls.",
            BYTES_PER_S,
            query(sum_rate("mist_registry_pushed_bytes_total"), "pushed"),
            query(sum_rate("mist_registry_pulled_bytes_total"), "pulled"),
        ),
        graph(
            "Stored weights",
            "Bytes of live version blobs (read from the store: max over replicas).",
            BYTES,
            query(f"max({sel('mist_registry_stored_bytes')})", "blobs"),
        ),
        graph(
            "Targets up",
            "Scrape targets answering, per service (0 for 5 minutes: MistTargetDown), and "
            "whether the registry can read its store (mist_registry_store_up, min over replicas).",
            COUNT,
            query(f"sum by (job) ({sel('up', 'job=~' + JOBS)})", "{{job}}"),
            query(f"min({sel('mist_registry_store_up')})", "registry store up"),
        ),
    ]


def fleet_row() -> list[Panel]:
    # The fleet gauges are read from the database by every replica: max over replicas, never sum.
    fresh = f"max by (task, version) ({sel('mist_registry_fleet_devices', eq('state', 'fresh'))})"
    stale = f"sum by (task) (max by (task, version) ({sel('mist_registry_fleet_devices', eq('state', 'stale'))}))"
    return [
        graph(
            "Devices by version in use",
            "Devices that reported within 90 s, by task and the version they run (ReportDevice heartbeats; "
            "mist registry fleet TASK lists them).",
            COUNT,
            query(fresh, "{{task}} v{{version}}"),
        ),
        graph(
            "Stale devices",
            "Devices silent for more than 90 s (three missed heartbeats), per task: offline, or an agent that stopped.",
            COUNT,
            query(stale, "{{task}}"),
        ),
        graph(
            "Staged rollouts",
            "Share of a task's devices each staged rollout reaches (mist registry promote --percent); the series ends "
            "when the rollout is finished or rolled back.",
            "percent",
            query(
                f"max by (task, alias, version) ({sel('mist_registry_rollout_percent')})",
                "{{task}}/{{alias}} v{{version}}",
            ),
        ),
        graph(
            "Watchers connected",
            "Open WatchAlias streams (devices waiting for alias moves), summed over registry replicas, and the alias "
            "events sent to them.",
            COUNT,
            query(f"sum ({sel('mist_registry_watchers')})", "watchers"),
            query(f"{sum_rate('mist_registry_watch_events_total')} * 60", "events per minute"),
        ),
    ]


# ---------------------------------------------------------------------------------------------- dashboard

ROWS = (
    ("Transfer: bytes per image actually sent", transfer_row),
    ("Extractor", extractor_row),
    ("Tuner", tuner_row),
    ("Registry", registry_row),
    ("Fleet: who runs what", fleet_row),
)


def variables() -> list[Any]:
    """A Prometheus data source picker (portable across Grafana installs) and a namespace filter."""
    source = dashboard_builders.DatasourceVariable("datasource").label("Data source").type("prometheus")
    namespace = (
        dashboard_builders.QueryVariable("namespace")
        .label("Namespace")
        .datasource(DATASOURCE)
        .query(f"label_values(up{{job=~{JOBS}}}, namespace)")
        .refresh(dashboard.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )  # ".*" also matches series without the label
    return [source, namespace]


def build_dashboard() -> dashboard.Dashboard:
    """The dashboard model, panels numbered 1..n in reading order."""
    builder = (
        dashboard_builders.Dashboard(TITLE)
        .uid(UID)
        .tags(["mist"])
        .editable()
        .refresh("30s")
        .time("now-3h", "now")
        .timezone("browser")
        .tooltip(dashboard.DashboardCursorSync.CROSSHAIR)
        .description(
            "Separated tuning (MIST): bytes per image actually sent next to LST, LAST, "
            "Partial-1, linear probing and uncompressed MIST; extractor, tuner and registry."
        )
    )
    for variable in variables():
        builder = builder.with_variable(variable)
    for title, panels in ROWS:
        builder = builder.with_row(dashboard_builders.Row(title))
        for panel in panels():
            builder = builder.with_panel(panel)
    model = builder.build()
    for number, panel in enumerate(model.panels or [], start=1):
        panel.id_val = number
    return model


def dashboard_json() -> str:
    """The dashboard as the committed JSON text (sorted keys, 2-space indent, trailing newline)."""
    return JSONEncoder(sort_keys=True, indent=2, ensure_ascii=False).encode(build_dashboard()) + "\n"
