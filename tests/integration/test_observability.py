"""Observability, checked for real: the extractor, registry and tuner run as subprocesses, a real Prometheus scrapes
them with deploy/prometheus/mist-rules.yml loaded, and the real clients send a short load. Then every PromQL query
of the Grafana dashboard and every rule runs through Prometheus's HTTP API, and the headline numbers must equal
what the clients counted. Also: promtool check/test of the rules, the generated files, the dashboard's structure.

The load runs in two phases. Phase 1 creates every series; once Prometheus has scraped every service, phase 2 runs,
and each query rates over a window that starts 1 ms before its service's first scrape showing phase 1 complete and
ends after every service's last scrape: rate() then counts phase 2 exactly (its extrapolation changes every series
of one target by the same factor), so ratios like bytes per image match the clients' own sums.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml

from scripts import build_monitoring
from services.common.clients.extractor import ExtractorClient, ExtractResult
from services.common.clients.registry import RegistryClient
from services.common.errors import InvalidArgumentError
from services.common.pb import tuner_pb2, tuner_pb2_grpc
from services.common.wire.codec import CodecConfig, encoded_nbytes, float32_nbytes
from services.common.wire.gather_modes import BackboneGeometry, GatherModeName, baseline_bytes_per_image
from services.tuner.synthetic import CLASS_NAMES
from tests.helpers.extractor import ExtractorProcess, png_image
from tests.helpers.prometheus import (
    PrometheusServer,
    PrometheusUnavailable,
    Sample,
    ensure_installed,
    eventually,
    run_promtool,
)
from tests.helpers.registry import RegistryProcess, make_blob, task_proto
from tests.helpers.stack import TunerProcess

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "mist-rules.yml"
RULES_TEST = PROMETHEUS_DIR / "mist-rules.test.yml"
TINY = BackboneGeometry(num_blocks=4, tokens=17, dims=32, num_prefix_tokens=1)  # tests/conftest.py TINY_VIT_KWARGS
JOBS = ("mist-extractor", "mist-registry", "mist-tuner")
TOLERANCE = 1e-3  # relative; what remains of rate()'s extrapolation with the window described above
# Extractor traffic of the clients below, by (gather mode, ks, codec); the tuner's Tune jobs use a third codec.
DIRECT_STREAMS: tuple[tuple[GatherModeName, tuple[int, ...], str], ...] = (
    ("mist", (2, 4), "i8-zstd"),
    ("mist", (4,), "f16-zstd"),
    ("lst", (), "f16-zstd"),
)
TUNER_CODEC = "bf16-zstd"


# ---------------------------------------------------------------------------------------------- fast checks


def rules_in_file() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_promtool_checks_the_rules_and_config_and_runs_every_unit_test():
    # Prepare
    try:
        check_rules = run_promtool("check", "rules", str(RULES))
    except PrometheusUnavailable as error:
        pytest.skip(f"promtool not available: {error}")

    # Execute
    check_config = run_promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    unit_tests = run_promtool("test", "rules", RULES_TEST.name, cwd=PROMETHEUS_DIR)

    # Assert
    assert check_rules.returncode == 0, check_rules.stdout + check_rules.stderr
    assert f"SUCCESS: {len(rules_in_file())} rules found" in check_rules.stdout
    assert check_config.returncode == 0, check_config.stdout + check_config.stderr
    assert unit_tests.returncode == 0, unit_tests.stdout + unit_tests.stderr
    tested = {
        t["alertname"]
        for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for t in case.get("alert_rule_test") or []
    }
    assert tested == {r["alert"] for r in rules_in_file() if "alert" in r}  # every alert has unit tests


def test_promtool_unit_tests_fail_when_an_alert_threshold_changes(tmp_path):
    # Prepare: the push-failure alert made blind to the 33% failures of the unit test's "prod" namespace
    (tmp_path / RULES.name).write_text(RULES.read_text().replace("rate15m > 0.1", "rate15m > 0.5"))
    (tmp_path / RULES_TEST.name).write_text(RULES_TEST.read_text())
    try:
        # Execute
        done = run_promtool("test", "rules", RULES_TEST.name, cwd=tmp_path)
    except PrometheusUnavailable as error:
        pytest.skip(f"promtool not available: {error}")

    # Assert
    assert done.returncode == 1
    assert "MistRegistryPushFailures" in done.stdout + done.stderr


def test_prometheus_rule_holds_exactly_the_rules_file_groups():
    # Prepare
    manifest = yaml.safe_load(build_monitoring.PROMETHEUS_RULE.read_text())

    # Execute
    rules = yaml.safe_load(RULES.read_text())

    # Assert
    assert manifest["kind"] == "PrometheusRule" and manifest["metadata"]["namespace"] == "mist"
    assert manifest["spec"]["groups"] == rules["groups"]
    assert build_monitoring.PROMETHEUS_RULE.read_text() == build_monitoring.prometheus_rule(RULES.read_text())


def test_generated_files_are_current():
    # Prepare
    pytest.importorskip("grafana_foundation_sdk", reason="the dashboard generator needs grafana-foundation-sdk")

    # Execute
    stale = build_monitoring.stale_files(build_monitoring.expected_files())

    # Assert
    assert stale == [], "run .venv/bin/python scripts/build_monitoring.py"
    assert build_monitoring.DASHBOARD.read_bytes() == build_monitoring.DASHBOARD_COPY.read_bytes()


def test_yaml_files_pass_yamllint():
    # Prepare
    yamllint = Path(sys.executable).parent / "yamllint"
    if not yamllint.exists():
        pytest.skip("yamllint is not installed (pip install yamllint)")

    # Execute
    done = subprocess.run(
        [
            str(yamllint),
            "--strict",
            "-c",
            str(ROOT / ".yamllint.yaml"),
            str(PROMETHEUS_DIR),
            str(build_monitoring.PROMETHEUS_RULE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    # Assert
    assert done.returncode == 0, done.stdout + done.stderr


def committed_dashboard() -> dict:
    return json.loads(build_monitoring.DASHBOARD.read_text())


def test_dashboard_structure():
    # Prepare
    doc = committed_dashboard()

    # Execute
    problems = build_monitoring.dashboard_problems(doc)
    every = list(build_monitoring.panels(doc))

    # Assert
    assert problems == []
    assert doc["uid"] == "mist-overview" and doc["schemaVersion"] >= 39
    assert [p["id"] for p in every] == list(range(1, len(every) + 1))
    assert [p["title"] for p in every if p["type"] == "row"] == [
        "Transfer: bytes per image actually sent",
        "Extractor",
        "Tuner",
        "Registry",
        "Fleet: who runs what",
    ]
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in every if p["type"] != "row"}
    assert units["× smaller than LST"] == "suffix:×" and units["MIST bytes per image"] == "bytes"
    assert units["Cache hit ratio"] == "percentunit" and units["Training step time"] == "s"


@pytest.mark.parametrize(
    "breach, expected",
    [
        (lambda d: d["panels"][2].update(id=1), "panel ids must be unique"),
        (lambda d: d["panels"][2]["gridPos"].update(x=2), "overlap"),
        (lambda d: d["panels"][2]["gridPos"].update(x=22), "not inside the 24-column grid"),
        (lambda d: d["panels"][2]["fieldConfig"]["defaults"].pop("unit"), "no unit"),
        (lambda d: d["panels"][2].update(datasource={"type": "prometheus", "uid": "prod"}), "datasource must be"),
        (lambda d: d["panels"][2]["targets"][0].pop("datasource"), "datasource must be"),
        (lambda d: d["panels"][2]["targets"][0].update(expr="up"), "up lacks the $namespace filter"),
        (lambda d: d["panels"][2].update(targets=[]), "no queries"),
        (lambda d: d["templating"].update(list=[]), "template variable 'datasource'"),
        (lambda d: d.update(schemaVersion=16), "schemaVersion"),
    ],
)
def test_dashboard_checker_reports_each_breach(breach, expected):
    # Prepare
    doc = copy.deepcopy(committed_dashboard())
    breach(doc)

    # Execute
    problems = build_monitoring.dashboard_problems(doc)

    # Assert
    assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------------------------------------- the load


@dataclass
class Counted:
    """What the clients saw of the phase-2 traffic, per (gather mode, codec)."""

    images: Counter[tuple[str, str]] = field(default_factory=Counter)  # answered "ok"
    bytes_sent: Counter[tuple[str, str]] = field(default_factory=Counter)  # serialized FeatureTensor bytes
    float32_bytes: Counter[tuple[str, str]] = field(default_factory=Counter)  # what they stand for as float32
    cache_hits: int = 0
    cache_lookups: int = 0  # images that reached the cache (decodable ones)
    tuner_images: int = 0
    tuner_bytes: int = 0

    def add(self, mode: str, codec: str, result: ExtractResult) -> None:
        if not result.ok:
            return
        key = (mode, CodecConfig.parse(codec).name)
        self.images[key] += 1
        self.bytes_sent[key] += sum(encoded_nbytes(f) for f in result.features)
        self.float32_bytes[key] += sum(float32_nbytes(f) for f in result.features)
        self.cache_hits += result.cache_hit
        self.cache_lookups += 1

    def add_tune(self, images: int, feature_bytes: int) -> None:
        """A Tune job's extraction, as its final ExtractionProgress event reported it (images are new: misses)."""
        self.images[("mist", CodecConfig.parse(TUNER_CODEC).name)] += images
        self.bytes_sent[("mist", CodecConfig.parse(TUNER_CODEC).name)] += feature_bytes
        self.cache_lookups += images
        self.tuner_images += images
        self.tuner_bytes += feature_bytes


def stream(
    target: str,
    mode: GatherModeName,
    ks: tuple[int, ...],
    codec: str,
    items: list[tuple[str, bytes]],
    counted: Counted | None,
) -> None:
    with ExtractorClient(target) as client:
        for result in client.extract(items, mode=mode, ks=ks, codec=codec, max_in_flight=8):
            if counted is not None:
                counted.add(mode, codec, result)


def extractor_load(target: str, phase: int, counted: Counted | None) -> None:
    """DIRECT_STREAMS at once (so batches mix them): new images (10 in phase 2, 4 in phase 1), phase 1's first
    three again in phase 2's i8-zstd stream (cache hits), a broken image in it, and a stream the server refuses
    (k out of range: INVALID_ARGUMENT)."""
    fresh = [100 * phase + i for i in range(10 if phase == 2 else 4)]
    repeated = [100 + i for i in range(3)] if phase == 2 else []
    seeds = ([*fresh, *repeated], [s + 50 for s in fresh], fresh[:2])
    broken = [("broken", b"not an image")]
    with ThreadPoolExecutor(len(DIRECT_STREAMS)) as pool:
        streams = [
            pool.submit(
                stream,
                target,
                mode,
                ks,
                codec,
                [(f"img-{s}", png_image(s)) for s in stream_seeds] + (broken if n == 0 else []),
                counted,
            )
            for n, ((mode, ks, codec), stream_seeds) in enumerate(zip(DIRECT_STREAMS, seeds, strict=True))
        ]
        with ExtractorClient(target) as client, pytest.raises(InvalidArgumentError):
            list(client.extract([("x", png_image(1))], ks=(99,)))
        for done in streams:
            done.result(60)  # re-raises a stream's failure here


def registry_load(target: str, phase: int) -> None:
    """A push, a push of NaN weights (INVALID_ARGUMENT), a pull, and an alias move; in phase 2 a staged rollout
    of the new version, a device watching the alias and two devices reporting."""
    with RegistryClient(target) as client:
        if phase == 1:
            client.create_task(task_proto("cats"))
        version = client.push("cats", make_blob(seed=phase), parent_version=phase - 1)
        with pytest.raises(InvalidArgumentError):
            client.push("cats", make_blob(nan=True), parent_version=version.number)
        client.pull("cats", version=version.number, use_cache=False)
        if phase == 1:
            client.set_alias("cats", "production", version.number)
            return
        watch = client.watch_alias("cats", "production", device="cam-1")
        events = iter(watch)
        assert next(events).version == 1
        client.set_alias("cats", "production", version.number, percent=20)
        assert next(events).stable_version == 1
        watch.cancel()
        for device, running in (("cam-1", 1), ("cam-2", version.number)):
            client.report_device("cats", device=device, alias="production", version=running)


def tune_requests(phase: int, *, k: int = 2) -> Iterator[tuner_pb2.TuneRequest]:
    codec = CodecConfig.parse(TUNER_CODEC).to_proto()
    yield tuner_pb2.TuneRequest(
        spec=tuner_pb2.TuneSpec(task="shapes", k=k, codec=codec, epochs=1, batch_size=8, seed=phase, val_fraction=0.25)
    )
    for n in range(16):  # two classes: png_image(seed) draws class CLASS_NAMES[seed % 8]
        seed = 1000 * phase + 8 * n + n % 2
        yield tuner_pb2.TuneRequest(
            image=tuner_pb2.LabelledImage(
                item_id=f"t{seed}", image=png_image(seed), label=CLASS_NAMES[seed % len(CLASS_NAMES)]
            )
        )


def tuner_load(target: str, phase: int, counted: Counted | None) -> None:
    """A Tune job (its extraction counted from its last ExtractionProgress event), a refused one, and in phase 1
    a Predict with the tuned version."""
    with grpc.insecure_channel(target) as channel:
        stub = tuner_pb2_grpc.TunerStub(channel)
        events = list(stub.Tune(tune_requests(phase), timeout=120))
        assert events[-1].WhichOneof("event") == "result", events[-1]
        last = [e.extraction for e in events if e.WhichOneof("event") == "extraction"][-1]
        if counted is not None:
            counted.add_tune(last.done, last.feature_bytes)
        with pytest.raises(grpc.RpcError):
            list(stub.Tune(tune_requests(phase, k=99), timeout=60))
        if phase == 1:
            items = [tuner_pb2.PredictRequest(spec=tuner_pb2.PredictSpec(task="shapes"))] + [
                tuner_pb2.PredictRequest(item=tuner_pb2.PredictItem(item_id=str(i), image=png_image(i)))
                for i in range(3)
            ]
            assert len(list(stub.Predict(iter(items), timeout=60))) == 3


# ---------------------------------------------------------------------------------------------- the services


def prometheus_config(metrics_ports: dict[str, int]) -> dict:
    """deploy/prometheus/prometheus.yml with this test's ports, a 1 s scrape and evaluation interval, and the
    rules file by absolute path."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_ports[job['job_name']]}"]}]
    return config


@dataclass(frozen=True)
class Observed:
    """Prometheus after the load, and per service the window over which it saw exactly phase 2."""

    prometheus: PrometheusServer
    at: float  # evaluation time: the last scrape of any service (Unix seconds)
    windows: dict[str, str]  # job -> PromQL duration from 1 ms before its first scrape after phase 1 to `at`
    counted: Counted

    def window(self, expr: str) -> str:
        """The window of the one service whose metrics `expr` reads (`up` alone: any)."""
        jobs = {f"mist-{name}" for name in re.findall(r"\bmist_(extractor|registry|tuner)_", expr)}
        assert len(jobs) <= 1, f"{expr!r} mixes services {jobs}"
        return self.windows[jobs.pop() if jobs else "mist-extractor"]

    def concrete(self, expr: str) -> str:
        """A dashboard query as Grafana would send it: every namespace, this test's rate window."""
        return expr.replace("$__rate_interval", self.window(expr)).replace('namespace=~"$namespace"', 'namespace=~".*"')

    def query(self, expr: str) -> list[Sample]:
        return self.prometheus.query(expr, at=self.at)

    def value(self, expr: str) -> float:
        samples = self.query(expr)
        assert len(samples) == 1, f"{expr!r}: {samples}"
        return samples[0].value


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> Iterator[Observed]:
    try:
        ensure_installed()
    except PrometheusUnavailable as error:
        pytest.skip(f"Prometheus not available: {error}")
    tmp = tmp_path_factory.mktemp("observability")
    extractor = ExtractorProcess()
    stops = [extractor.stop]
    try:
        registry = RegistryProcess.start(f"sqlite:///{tmp}/registry.db")  # while the extractor loads torch
        stops.append(registry.kill)
        target, extractor_metrics = extractor.wait_listening()
        tuner = TunerProcess(target, registry.target)
        stops.append(tuner.stop)
        tuner_target, tuner_metrics = tuner.wait_listening()
        ports = {
            "mist-extractor": extractor_metrics,
            "mist-registry": registry.metrics_port,
            "mist-tuner": tuner_metrics,
        }
        prometheus = PrometheusServer.start(prometheus_config(ports), tmp / "prometheus")
        stops.append(prometheus.stop)
        counted = Counted()
        for phase, counter in ((1, None), (2, counted)):
            extractor_load(target, phase, counter)
            registry_load(registry.target, phase)
            tuner_load(tuner_target, phase, counter)
            scrapes = prometheus.wait_scraped_after(time.time(), JOBS)
            if phase == 1:
                starts = {job: t - 0.001 for job, t in scrapes.items()}  # phase 1 whole, none of phase 2
        at = max(scrapes.values())
        yield Observed(prometheus, at, {job: f"{round((at - t) * 1000)}ms" for job, t in starts.items()}, counted)
    finally:
        for stop in reversed(stops):
            stop()


# ---------------------------------------------------------------------------------------------- against Prometheus


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query in the committed dashboard."""
    return [
        (panel["title"], target["refId"], target["expr"])
        for panel in build_monitoring.panels(committed_dashboard())
        for target in panel.get("targets") or []
    ]


def panel_query(title: str, ref_id: str = "A") -> str:
    return next(expr for t, r, expr in dashboard_queries() if (t, r) == (title, ref_id))


@pytest.mark.slow
def test_every_dashboard_query_returns_finite_values(observed):
    # Prepare
    queries = dashboard_queries()

    # Execute
    results = {(title, ref_id): observed.query(observed.concrete(expr)) for title, ref_id, expr in queries}

    # Assert
    assert len(queries) >= 45
    empty = [key for key, samples in results.items() if not samples]
    not_finite = [(key, s) for key, samples in results.items() for s in samples if not s.finite]
    assert empty == [] and not_finite == []


@pytest.mark.slow
def test_bytes_per_image_panel_equals_what_the_clients_counted(observed):
    # Prepare
    expr = observed.concrete(panel_query("Bytes per image: sent vs baselines", "A"))
    counted = observed.counted

    # Execute
    measured = {(s.labels["mode"], s.labels["codec"]): s.value for s in observed.query(expr)}

    # Assert: every (mode, codec) of phase 2, the tuner's bf16-zstd Tune job included
    expected = {key: counted.bytes_sent[key] / counted.images[key] for key in counted.images}
    assert (
        set(measured)
        == set(expected)
        == {("mist", "i8-zstd"), ("mist", "f16-zstd"), ("lst", "f16-zstd"), ("mist", "bf16-zstd")}
    )
    for key, value in expected.items():
        assert measured[key] == pytest.approx(value, rel=TOLERANCE), key
    assert counted.images[("mist", "i8-zstd")] == 13 and counted.images[("lst", "f16-zstd")] == 2


@pytest.mark.slow
def test_headline_ratios_equal_the_baselines_over_the_counted_bytes(observed):
    # Prepare
    counted, baselines = observed.counted, baseline_bytes_per_image(TINY)
    mist = [key for key in counted.images if key[0] == "mist"]
    mist_per_image = sum(counted.bytes_sent[k] for k in mist) / sum(counted.images[k] for k in mist)

    # Execute
    gauges = {
        s.labels["method"]: s.value
        for s in observed.query(observed.concrete(panel_query("Bytes per image: sent vs baselines", "B")))
    }
    ratio = {
        title: observed.value(observed.concrete(panel_query(title)))
        for title in (
            "× smaller than LST",
            "× smaller than LAST",
            "× smaller than Partial-1",
            "MIST bytes per image",
            "Share of uncompressed MIST",
        )
    }

    # Assert
    assert gauges == {"lst": 10880, "last": 6528, "partial": 2176, "cls": 128, "mist_f32": 2176} == baselines
    assert ratio["MIST bytes per image"] == pytest.approx(mist_per_image, rel=TOLERANCE)
    assert ratio["× smaller than LST"] == pytest.approx(baselines["lst"] / mist_per_image, rel=TOLERANCE)
    assert ratio["× smaller than LAST"] == pytest.approx(baselines["last"] / mist_per_image, rel=TOLERANCE)
    assert ratio["× smaller than Partial-1"] == pytest.approx(baselines["partial"] / mist_per_image, rel=TOLERANCE)
    assert ratio["Share of uncompressed MIST"] == pytest.approx(mist_per_image / baselines["mist_f32"], rel=TOLERANCE)
    assert 5 < ratio["× smaller than LST"] < 40  # i8, f16 and bf16 features of a 17 x 32 map


@pytest.mark.slow
def test_extractor_and_tuner_panels_match_the_clients(observed):
    # Prepare
    counted = observed.counted
    direct = [key for key in counted.images if key != ("mist", "bf16-zstd")]

    # Execute
    compression = {
        s.labels["codec"]: s.value for s in observed.query(observed.concrete(panel_query("Codec compression ratio")))
    }
    hit_ratio = observed.value(observed.concrete(panel_query("Cache hit ratio")))
    received = {
        s.labels.get("received", "tune"): s.value
        for s in observed.query(observed.concrete(panel_query("Bytes per image received by the tuners", "A")))
    }
    failed = observed.query(observed.concrete(panel_query("Failed calls by code")))
    item_errors = observed.query(observed.concrete(panel_query("Per-item errors by reason")))

    # Assert
    i8 = [k for k in direct if k[1] == "i8-zstd"]
    assert compression["i8-zstd"] == pytest.approx(
        sum(counted.float32_bytes[k] for k in i8) / sum(counted.bytes_sent[k] for k in i8), rel=TOLERANCE
    )
    assert hit_ratio == pytest.approx(counted.cache_hits / counted.cache_lookups, rel=TOLERANCE)
    assert counted.cache_hits == 3
    assert received["tune"] == pytest.approx(counted.tuner_bytes / counted.tuner_images, rel=1e-2)
    assert {(s.labels["method"], s.labels["code"]) for s in failed} >= {
        ("/mist.v1.Extractor/Extract", "INVALID_ARGUMENT")
    }
    assert {s.labels["status"] for s in item_errors} == {"undecodable_image"}


@pytest.mark.slow
def test_registry_panels_show_the_pushes_and_versions(observed):
    # Execute
    by_status = {
        (s.labels.get("code"), s.value > 0)
        for s in observed.query(observed.concrete(panel_query("Pushes and pulls by status", "A")))
    }
    versions = {s.labels["task"]: s.value for s in observed.query(observed.concrete(panel_query("Versions per task")))}
    moves = observed.value(observed.concrete(panel_query("Alias moves")))

    # Assert
    assert {("OK", True), ("INVALID_ARGUMENT", True)} <= by_status
    assert versions == {"cats": 2, "shapes": 2}  # one push per phase each (refused pushes store nothing)
    assert moves > 0


@pytest.mark.slow
def test_every_rule_evaluates_and_records_a_finite_series(observed):
    # Prepare
    rules = observed.prometheus.rules()
    records = [rule["name"] for rule in rules if rule["type"] == "recording"]

    def recorded_after_the_load() -> dict[str, list[Sample]]:
        """Each recorded series whose every sample was evaluated after the load's last scrape."""
        stamps = {name: observed.prometheus.query(f"timestamp({name})") for name in records}
        return {
            name: observed.prometheus.query(name)
            for name, found in stamps.items()
            if found and all(s.value > observed.at for s in found)
        }

    # Execute: rules evaluate every second, on the scrapes up to then
    recorded = eventually(recorded_after_the_load, lambda found: len(found) == len(records))

    # Assert
    assert [r["name"] for r in rules] == [r.get("record") or r.get("alert") for r in rules_in_file()]
    assert sorted(set(records) - set(recorded)) == []
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    assert [name for name, samples in recorded.items() if not samples or not all(s.finite for s in samples)] == []


@pytest.mark.slow
def test_alerts_react_to_the_load(observed):
    # Execute: a third of the pushes failed (2 refused of 6), so the push alert goes pending (its `for` is 15m)
    states = eventually(observed.prometheus.alert_states, lambda found: found["MistRegistryPushFailures"] == "pending")

    # Assert
    assert states["MistRegistryPushFailures"] == "pending"
    assert states["MistTargetDown"] == states["MistRegistryStoreDown"] == "inactive"
    assert states["MistTransferOverheadRegression"] == states["MistExtractorErrorRateHigh"] == "inactive"
