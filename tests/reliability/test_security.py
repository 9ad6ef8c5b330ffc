"""Security across the services: a tune end to end over mutual TLS (plaintext, certificate-less and foreign-CA clients
refused by both servers); a session of the three server processes with bearer tokens, a --weights file and a --db
file, after which no token, password or absolute host path may appear in a log line or a metrics label.

Proven elsewhere (see README.md): TLS / mTLS of the shared plumbing (tests/integration/test_server_plumbing.py),
per-task and read-only token scopes and UNAUTHENTICATED answers that do not tell whether a task exists
(tests/integration/test_registry_service.py).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import safetensors.torch

from bench.common import child_env  # no MIST_* variables: a server refuses unknown ones (MIST_STRESS_SCALE...)
from services.common.clients.extractor import ExtractorClient
from services.common.clients.registry import RegistryClient
from services.common.errors import MistError
from services.common.pb import extractor_pb2, extractor_pb2_grpc, feature_pb2, tuner_pb2, tuner_pb2_grpc
from services.common.wire.edge_spec import EdgeNetworkConfig
from services.extractor.backbone import LoadedBackbone, weights_fingerprint
from services.registry.config import RegistryConfig
from services.tuner.config import Endpoints
from services.tuner.data import dataset_from_memory
from services.tuner.tune import TuneOptions, tune_dataset
from tests.helpers.certs import CertPaths, make_certs
from tests.helpers.extractor import TINY_BACKBONE, ExtractorProcess, ExtractorServer, png_image, tiny_config
from tests.helpers.process import ROOT
from tests.helpers.registry import InProcessRegistry, RegistryProcess, task_proto
from tests.helpers.stack import TunerProcess
from tests.reliability import label_values, lines_containing, scrape

CLASSES = ("a", "b")
EDGE = EdgeNetworkConfig(dims=32, tokens=17, num_classes=2, num_blocks=2, rank=4)


def labelled_images(count: int = 12) -> list[tuple[str, bytes, str, str]]:
    """(item id, PNG, label, split): two classes alternating; the last image of each is for validation."""
    return [
        (f"img{i}", png_image(70_000 + i), CLASSES[i % 2], "val" if i >= count - 2 else "train") for i in range(count)
    ]


# ---------------------------------------------------------------------------------------------- mutual TLS


def refused(call: Callable[[], object]) -> str:
    """The status name a call ends with ("OK" if it succeeds); client-side MistErrors count by their code."""
    try:
        call()
    except grpc.RpcError as error:
        return error.code().name
    except MistError as error:  # the clients raise the domain error of the status
        return error.code
    return "OK"


@contextlib.contextmanager
def mtls_servers(
    backbone: LoadedBackbone, directory: Path
) -> Iterator[tuple[CertPaths, ExtractorServer, InProcessRegistry]]:
    """An extractor and a registry that both demand a client certificate signed by the test CA."""
    certs = make_certs(directory)
    tls = dict(tls_cert=str(certs.server_cert), tls_key=str(certs.server_key), tls_client_ca=str(certs.ca))
    with (
        ExtractorServer(tiny_config(**tls), backbone=backbone) as extractor,
        InProcessRegistry(RegistryConfig(db=f"sqlite:///{directory}/r.db", metrics_listen="off", **tls)) as registry,
    ):
        yield certs, extractor, registry


def test_a_tune_runs_end_to_end_over_mutual_tls_and_every_other_client_is_refused(
    tiny_backbone: LoadedBackbone, tmp_path: Path, figures
) -> None:
    # Prepare: both servers demand a client certificate signed by the test CA
    with mtls_servers(tiny_backbone, tmp_path) as (certs, extractor, registry):
        endpoints = Endpoints(
            extractor=extractor.target,
            registry=registry.target,
            tls_ca=str(certs.ca),
            client_cert=str(certs.client_cert),
            client_key=str(certs.client_key),
        )
        dataset = dataset_from_memory(labelled_images())

        # Execute: the whole tune, then a pull, over mTLS
        with endpoints.extractor_client() as x, endpoints.registry_client() as r:
            result = tune_dataset(dataset, TuneOptions(task="secure", k=2, epochs=2), x, r)
            pulled = r.pull("secure", version=result.version.number, use_cache=False)
        outsiders = {
            "plaintext": {},
            "tls-without-client-certificate": {"tls_ca": certs.ca},
            "certificate-of-another-ca": {
                "tls_ca": certs.ca,
                "client_cert": certs.rogue_client_cert,
                "client_key": certs.rogue_client_key,
            },
        }
        answers = {}
        for name, kwargs in outsiders.items():
            with (
                ExtractorClient(extractor.target, **kwargs) as x,
                RegistryClient(registry.target, timeout_s=5, **kwargs) as r,
            ):
                answers[name] = (
                    refused(lambda x=x: x.describe(timeout_s=5)),
                    refused(lambda r=r: r.get_task("secure")),
                )

    # Assert
    figures.add(
        version=result.version.number,
        k=result.k,
        feature_bytes_per_image=result.transfer.bytes_per_image,
        refusals=answers,
    )
    assert result.version.number == 1 and result.extraction.images == len(dataset)
    assert pulled.version.sha256 == result.version.sha256
    assert answers == {name: ("UNAVAILABLE", "UNAVAILABLE") for name in outsiders}


def test_a_tuner_worker_tunes_through_mutual_tls_upstream_with_its_certificate_flags(
    tiny_backbone: LoadedBackbone, tmp_path: Path, figures
) -> None:
    # Prepare: extractor and registry demand client certificates; a mist-tuner process is given its own
    with mtls_servers(tiny_backbone, tmp_path) as (certs, extractor, registry):
        worker = TunerProcess(
            extractor.target,
            registry.target,
            "--upstream-tls-ca",
            str(certs.ca),
            "--upstream-tls-cert",
            str(certs.client_cert),
            "--upstream-tls-key",
            str(certs.client_key),
        )
        try:
            worker.wait_listening()
            spec = tuner_pb2.TuneSpec(task="through-mtls", k=2, epochs=2)
            requests = [tuner_pb2.TuneRequest(spec=spec)] + [
                tuner_pb2.TuneRequest(image=tuner_pb2.LabelledImage(item_id=i, image=b, label=label))
                for i, b, label, _ in labelled_images()
            ]
            # Execute
            with grpc.insecure_channel(worker.target) as channel:
                outcome = status(lambda: tuner_pb2_grpc.TunerStub(channel).Tune(iter(requests), timeout=120))
        finally:
            worker.kill()
        with RegistryClient(
            registry.target, tls_ca=certs.ca, client_cert=certs.client_cert, client_key=certs.client_key
        ) as reader:
            versions = [v.number for v in reader.list_versions("through-mtls")]

    # Assert
    figures.add(tune=outcome[0], versions=versions)
    assert outcome == ("OK", ""), worker.log()[-3000:]
    assert versions == [1]


# ---------------------------------------------------------------------------------------------- a session with secrets


@dataclass
class Session:
    """What the three server processes logged and exported after a session with tokens, a weights file and a DB."""

    secrets: dict[str, str]  # label -> token
    host_paths: dict[str, str]  # label -> absolute path a flag named
    logs: dict[str, list[str]]  # server -> its log lines
    scrapes: dict[str, str]  # server -> its /metrics text
    codes: dict[str, tuple[str, str]] = field(default_factory=dict)  # call -> (status name, details)


def free_port() -> int:
    """A port free right now (for a server started next, so that another can be told its address at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A port bound here but not listening: every connection to it is refused, and nobody else can take it."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


def status(call: Callable[[], object]) -> tuple[str, str]:
    """(status name, details) a call ends with, streams drained; ("OK", "") when it succeeds."""
    try:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    except grpc.RpcError as error:
        return error.code().name, error.details()
    except MistError as error:  # the clients raise the domain error of the status
        return error.code, str(error)
    return "OK", ""


def write_secrets(directory: Path, backbone: LoadedBackbone) -> tuple[dict[str, str], dict[str, Path]]:
    """Tokens (long random-looking strings a grep cannot hit by chance) and the files the flags name."""
    secrets = {
        "admin": "admin-SECRET-7f3c9a1e5b2d8046",
        "extractor": "xtr-SECRET-0b8e4d2a9c61f735",
        "worker": "wrk-SECRET-5a7c1e9b3d0f2864",
        "wrong": "bad-SECRET-91d3b5f7a2c4e608",
    }
    files = {
        name: directory / name
        for name in ("admin-token", "extractor-tokens", "worker-tokens", "extractor-token", "registry-token", "weights")
    }
    files["admin-token"].write_text(secrets["admin"] + "\n")
    files["extractor-tokens"].write_text(f"tuner-worker:{secrets['extractor']}\n")
    files["worker-tokens"].write_text(f"device-7:{secrets['worker']}\n")
    files["extractor-token"].write_text(secrets["extractor"] + "\n")
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(files["weights"])
    )
    return secrets, files


def create_tasks(registry: RegistryProcess, admin_token: str, weights: Path) -> str:
    """Admin makes tasks alpha and beta for the extractor's weights; returns a read-write token for alpha only."""
    backbone = feature_pb2.BackboneId(name=TINY_BACKBONE, weights_fingerprint=weights_fingerprint(weights))
    with RegistryClient(registry.target, token=admin_token) as admin:
        for name in ("alpha", "beta"):
            task = task_proto(name, EDGE, CLASSES)
            task.backbone.CopyFrom(backbone)
            admin.create_task(task)
        return admin.create_token("worker-alpha", task="alpha", scope="read_write")


def run_session(
    registry: RegistryProcess, extractor_target: str, worker: TunerProcess, secrets: dict[str, str]
) -> dict[str, tuple[str, str]]:
    """The worker tunes and predicts with its tokens; strangers and the wrong task's token knock everywhere."""
    codes: dict[str, tuple[str, str]] = {}
    auth = [("authorization", f"Bearer {secrets['worker']}")]
    with grpc.insecure_channel(worker.target) as channel:
        stub = tuner_pb2_grpc.TunerStub(channel)
        spec = tuner_pb2.TuneSpec(task="alpha", k=2, epochs=2)
        images = [
            tuner_pb2.TuneRequest(image=tuner_pb2.LabelledImage(item_id=i, image=b, label=label))
            for i, b, label, _ in labelled_images()
        ]
        codes["worker tune"] = status(
            lambda: stub.Tune(iter([tuner_pb2.TuneRequest(spec=spec), *images]), metadata=auth, timeout=120)
        )
        predict = [
            tuner_pb2.PredictRequest(spec=tuner_pb2.PredictSpec(task="alpha")),
            tuner_pb2.PredictRequest(item=tuner_pb2.PredictItem(item_id="p", image=png_image(1))),
        ]
        codes["worker predict"] = status(lambda: stub.Predict(iter(predict), metadata=auth, timeout=60))
        wrong = [("authorization", f"Bearer {secrets['wrong']}")]
        codes["worker, wrong token"] = status(lambda: stub.Predict(iter(predict), metadata=wrong, timeout=10))
    for task in ("alpha", "no-such-task"):
        with RegistryClient(registry.target, token=secrets["wrong"], timeout_s=10) as stranger:
            codes[f"registry {task}, wrong token"] = status(lambda s=stranger, t=task: s.get_task(t))
    for task in ("beta", "no-such-task"):
        with RegistryClient(registry.target, token=secrets["device"], timeout_s=10) as device:
            codes[f"registry {task}, token of alpha"] = status(lambda d=device, t=task: d.get_task(t))
    with grpc.insecure_channel(extractor_target) as channel:
        describe = extractor_pb2_grpc.ExtractorStub(channel).Describe
        codes["extractor, wrong token"] = status(
            lambda: describe(
                extractor_pb2.DescribeRequest(), timeout=10, metadata=[("authorization", f"Bearer {secrets['wrong']}")]
            )
        )
    return codes


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: LoadedBackbone) -> Iterator[Session]:
    """The three servers as processes, each with bearer tokens and files named by absolute paths."""
    directory = tmp_path_factory.mktemp("secrets").resolve()
    secrets, files = write_secrets(directory, tiny_backbone)
    db = directory / "registry.db"
    port = free_port()  # the worker is told where the extractor will be, so both can start at once
    extractor = ExtractorProcess(
        "--listen",
        f"127.0.0.1:{port}",
        "--weights",
        str(files["weights"]),
        "--auth-tokens-file",
        str(files["extractor-tokens"]),
    )
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(extractor.stop)
        registry = RegistryProcess.start(
            f"sqlite:///{db}", "--auth", "on", "--admin-token-file", str(files["admin-token"])
        )
        cleanup.callback(registry.kill)
        secrets["device"] = create_tasks(registry, secrets["admin"], files["weights"])
        files["registry-token"].write_text(secrets["device"] + "\n")
        worker = TunerProcess(
            f"127.0.0.1:{port}",
            registry.target,
            "--registry-token-file",
            str(files["registry-token"]),
            "--extractor-token-file",
            str(files["extractor-token"]),
            "--auth-tokens-file",
            str(files["worker-tokens"]),
        )
        cleanup.callback(worker.kill)
        extractor_target, extractor_metrics = extractor.wait_listening(timeout_s=120)
        worker.wait_listening()
        codes = run_session(registry, extractor_target, worker, secrets)
        scrapes = {
            "extractor": scrape(f"http://127.0.0.1:{extractor_metrics}/metrics"),
            "registry": scrape(f"http://127.0.0.1:{registry.metrics_port}/metrics"),
            "tuner": scrape(f"http://127.0.0.1:{worker.metrics_port}/metrics"),
        }
        registry.terminate()
        cleanup.close()
        yield Session(
            secrets=secrets,
            host_paths={"directory": str(directory), "db": str(db), "weights": str(files["weights"])},
            logs={"extractor": extractor.lines, "registry": registry.log().splitlines(), "tuner": worker.lines},
            scrapes=scrapes,
            codes=codes,
        )


def test_the_session_itself_worked_and_strangers_were_refused_alike(session: Session, figures) -> None:
    codes = session.codes
    figures.add(**{name: code for name, (code, _) in codes.items()})
    assert codes["worker tune"][0] == codes["worker predict"][0] == "OK"
    assert codes["worker, wrong token"][0] == codes["extractor, wrong token"][0] == "UNAUTHENTICATED"
    # A wrong token, or a token of another task, gets the same answer whether the task exists or not.
    assert codes["registry alpha, wrong token"] == codes["registry no-such-task, wrong token"]
    assert codes["registry alpha, wrong token"][0] == "UNAUTHENTICATED"
    assert codes["registry beta, token of alpha"] == codes["registry no-such-task, token of alpha"]
    assert codes["registry beta, token of alpha"][0] == "PERMISSION_DENIED"


def test_no_token_reaches_a_log_line_or_a_metric(session: Session, figures) -> None:
    leaks = {server: lines_containing(lines, session.secrets.values()) for server, lines in session.logs.items()}
    exported = {server: [s for s in session.secrets.values() if s in text] for server, text in session.scrapes.items()}
    figures.add(
        log_lines={server: len(lines) for server, lines in session.logs.items()},
        token_leaks=sum(map(len, leaks.values())),
    )
    assert all(session.logs.values()) and "effective config" in "\n".join(session.logs["registry"])
    assert leaks == {server: [] for server in session.logs}
    assert exported == {server: [] for server in session.scrapes}


def test_no_metric_label_holds_a_secret_or_a_host_path(session: Session) -> None:
    needles = [*session.secrets.values(), *session.host_paths.values()]
    found = {
        server: sorted(v for v in label_values(text) if any(n in v for n in needles))
        for server, text in session.scrapes.items()
    }
    assert found == {server: [] for server in session.scrapes}


def test_no_log_line_holds_an_absolute_host_path(session: Session, figures) -> None:
    found = {
        server: lines_containing(lines, [session.host_paths["directory"]]) for server, lines in session.logs.items()
    }
    figures.add(
        **{f"{server}_lines_with_paths": len(hits) for server, hits in found.items()},
        example=next((line[:160] for hits in found.values() for _, line in hits), ""),
    )
    assert found == {server: [] for server in session.logs}


def test_a_database_password_never_reaches_the_log_even_when_the_database_is_down(tmp_path: Path) -> None:
    # A PostgreSQL URL whose password must be masked; nothing listens on that port, so the start fails.
    with refusing_port() as port:
        url = f"postgresql://mist:hunter2-SECRET@127.0.0.1:{port}/registry"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "services.registry.server",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "off",
                "--db",
                url,
            ],
            cwd=ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert result.returncode == 1, result.stderr[-2000:]
    assert "mist-registry failed to start: cannot connect to PostgreSQL" in result.stderr, result.stderr[-2000:]
    assert "hunter2" not in result.stderr + result.stdout


def test_a_database_password_is_masked_in_the_effective_config_of_a_running_registry(
    postgres_server, tmp_path: Path
) -> None:
    url = postgres_server.create_schema().replace("postgresql://postgres@", "postgresql://postgres:hunter2-SECRET@")
    with RegistryProcess.start(url) as server:
        with RegistryClient(server.target) as client:
            client.create_task(task_proto("pw"))
        server.terminate()
    log = server.log()

    assert "effective config" in log and "hunter2" not in log
    assert "***" in next(line for line in log.splitlines() if "effective config" in line)
