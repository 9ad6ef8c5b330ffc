"""The rules every mist Kubernetes manifest and Dockerfile must follow, as pure functions over parsed documents,
so that `make lint` (scripts/check_manifests.py) and the tests enforce exactly the same thing.

    problems = workload_problems(docs) + reference_problems(docs)   # [] when the rendered overlay is sound
    problems = dockerfile_problems(Path("deploy/docker/tuner.Dockerfile").read_text(), must_not_import=["timm"])
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from services.common.config import ServerConfig, parse_config

Doc = dict[str, Any]
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
RUN_AS_USER = 10001  # the uid the Dockerfiles create; manifests must run as it
# What the server does with SIGTERM when MIST_GRACE_S is not set (the shared ServerConfig default).
DEFAULT_GRACE_S = next(f.default for f in dataclasses.fields(ServerConfig) if f.name == "grace_s")
# Stand-ins for values a cluster fills in, so that a container's settings can be parsed offline.
SECRET_STAND_INS = {("mist-registry-db", "url"): "postgresql://mist@postgres.example:5432/mist"}


# ---------------------------------------------------------------------------------------------- lookups


def named(doc: Doc) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def of_kind(docs: Iterable[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d.get("kind") == kind]


def find(docs: Iterable[Doc], kind: str, name: str) -> Doc | None:
    return next((d for d in docs if d.get("kind") == kind and d.get("metadata", {}).get("name") == name), None)


def pod_templates(docs: Iterable[Doc]) -> list[tuple[Doc, Doc]]:
    """(workload, pod template) for every Deployment, StatefulSet, DaemonSet and Job."""
    return [(d, d["spec"]["template"]) for d in docs if d.get("kind") in WORKLOAD_KINDS]


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) against labels; an empty selector matches everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        ok = {
            "In": present and labels[key] in values,
            "NotIn": not present or labels[key] not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[op]
        if not ok:
            return False
    return True


def pods_selected(docs: Iterable[Doc], selector: Mapping[str, Any], *, plain: bool = False) -> list[Doc]:
    """Pod templates a selector picks; `plain`: a Service-style selector (a bare label map)."""
    sel = {"matchLabels": selector} if plain else selector
    return [t for _, t in pod_templates(docs) if selector_matches(sel, t["metadata"].get("labels") or {})]


def container_ports(template: Doc) -> dict[str, int]:
    """Port name -> number over every container of a pod template."""
    return {
        p["name"]: p["containerPort"]
        for c in template["spec"]["containers"]
        for p in c.get("ports") or []
        if "name" in p
    }


def cpu_cores(quantity: str | int | float) -> float:
    """A CPU quantity ("500m", "2", 4) in cores."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def effective_env(docs: Sequence[Doc], container: Doc) -> dict[str, str]:
    """What the container's process sees: envFrom ConfigMaps, then `env` (which wins). Values the cluster
    fills in become stand-ins: a Secret key -> SECRET_STAND_INS or "<secret NAME/KEY>", limits.cpu -> cores."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef")
        cm = find(docs, "ConfigMap", ref["name"]) if ref else None
        env.update({source.get("prefix", "") + k: v for k, v in ((cm or {}).get("data") or {}).items()})
    for var in container.get("env") or []:
        value_from = var.get("valueFrom") or {}
        if "value" in var or not value_from:
            env[var["name"]] = str(var.get("value", ""))
        elif "secretKeyRef" in value_from:
            ref = value_from["secretKeyRef"]
            env[var["name"]] = SECRET_STAND_INS.get((ref["name"], ref["key"]), f"<secret {ref['name']}/{ref['key']}>")
        elif "resourceFieldRef" in value_from and value_from["resourceFieldRef"]["resource"] == "limits.cpu":
            limit = container.get("resources", {}).get("limits", {}).get("cpu", 1)
            env[var["name"]] = str(math.ceil(cpu_cores(limit)))
        else:
            env[var["name"]] = "<from the cluster>"
    return env


def host_port(address: str) -> int | None:
    _, _, port = address.rpartition(":")
    return int(port) if port.isdigit() else None


# ---------------------------------------------------------------------------------------------- workloads


def workload_problems(docs: Sequence[Doc]) -> list[str]:
    """Every pod of a workload: restricted security, no API token, no service links, probes, resources,
    named ports matching the MIST_* listen addresses, a writable /tmp, and a drain that fits its grace period."""
    problems: list[str] = []
    for workload, template in pod_templates(docs):
        where = named(workload)
        problems += [f"{where}: {p}" for p in _pod_problems(docs, template["spec"])]
        for container in template["spec"]["containers"]:
            problems += [
                f"{where} container {container['name']}: {p}"
                for p in _container_problems(docs, template["spec"], container, workload)
            ]
    return problems


def _pod_problems(docs: Sequence[Doc], pod: Doc) -> list[str]:
    problems = []
    sc = pod.get("securityContext") or {}
    if sc.get("runAsNonRoot") is not True or sc.get("runAsUser") != RUN_AS_USER:
        problems.append(f"pod securityContext needs runAsNonRoot: true and runAsUser: {RUN_AS_USER}")
    if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append("pod securityContext needs seccompProfile RuntimeDefault")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken must be false (the services never call the API server)")
    if pod.get("enableServiceLinks") is not False:
        problems.append(
            "enableServiceLinks must be false: service links inject MIST_*_PORT variables the "
            "servers refuse as unknown settings"
        )
    account = pod.get("serviceAccountName")
    sa = find(docs, "ServiceAccount", account) if account else None
    if sa is None:
        problems.append(f"serviceAccountName {account!r} names no ServiceAccount in the output")
    elif sa.get("automountServiceAccountToken") is not False:
        problems.append(f"ServiceAccount {account} must set automountServiceAccountToken: false")
    return problems


def _container_problems(docs: Sequence[Doc], pod: Doc, container: Doc, workload: Doc) -> list[str]:
    problems = security_problems(container) + _resource_problems(container)
    image = container.get("image", "")
    if "@sha256:" not in image and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
        problems.append(f"image {image!r} needs a fixed tag or digest")
    env = effective_env(docs, container)
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
    for name, var in (("grpc", "MIST_LISTEN"), ("metrics", "MIST_METRICS_LISTEN")):
        if name not in ports:
            problems.append(f"needs a container port named {name!r}")
        elif host_port(env.get(var, "")) != ports[name]:
            problems.append(f"{var}={env.get(var)!r} does not listen on the {name!r} port {ports[name]}")
    problems += _probe_problems(container, ports.get("grpc"), tls="MIST_TLS_CERT" in env)
    problems += _volume_problems(pod, container, workload)
    pre_stop = ((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds")
    if pre_stop is None:
        problems.append("needs a preStop sleep so endpoints drop the pod before the drain starts")
    grace = float(env.get("MIST_GRACE_S", DEFAULT_GRACE_S))
    period = pod.get("terminationGracePeriodSeconds", 30)
    if period <= (pre_stop or 0) + grace:
        problems.append(
            f"terminationGracePeriodSeconds {period} must exceed preStop {pre_stop} s + "
            f"MIST_GRACE_S {grace:g} s, or in-flight calls are killed mid-drain"
        )
    return problems


def security_problems(container: Doc) -> list[str]:
    """The restricted container securityContext: no escalation, read-only root, non-root 10001, no capabilities."""
    sc = container.get("securityContext") or {}
    wanted = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
    }
    problems = [f"securityContext.{k} must be {str(v).lower()}" for k, v in wanted.items() if sc.get(k) != v]
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        problems.append("securityContext.capabilities.drop must contain ALL")
    if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append("securityContext.seccompProfile must be RuntimeDefault")
    return problems


def _resource_problems(container: Doc) -> list[str]:
    resources = container.get("resources") or {}
    return [
        f"resources.{kind}.{what} must be set"
        for kind in ("requests", "limits")
        for what in ("cpu", "memory")
        if what not in (resources.get(kind) or {})
    ]


def _probe_problems(container: Doc, grpc_port: int | None, *, tls: bool) -> list[str]:
    """Readiness and liveness must ask grpc.health.v1 on the gRPC port; with server TLS (the kubelet's gRPC
    probe speaks plaintext) a TCP check of that port is accepted instead."""
    problems = []
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = container.get(kind)
        if probe is None:
            if kind != "startupProbe":
                problems.append(f"needs a {kind}")
            continue
        if "grpc" in probe:
            if probe["grpc"].get("port") != grpc_port:
                problems.append(f"{kind} must check the gRPC port {grpc_port}, not {probe['grpc'].get('port')}")
        elif not (tls and (probe.get("tcpSocket") or {}).get("port") in ("grpc", grpc_port)):
            problems.append(f"{kind} must be a native grpc probe (tcpSocket on the grpc port only with TLS)")
    return problems


def _volume_problems(pod: Doc, container: Doc, workload: Doc) -> list[str]:
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates") or []}
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts") or []}
    problems = [
        f"volumeMount {name!r} has no volume" for name in mounts.values() if name not in volumes and name not in claims
    ]
    if "emptyDir" not in volumes.get(mounts.get("/tmp", ""), {}):
        problems.append("needs an emptyDir at /tmp (the root filesystem is read-only)")
    return problems


# ---------------------------------------------------------------------------------------------- references


def reference_problems(docs: Sequence[Doc]) -> list[str]:
    """Selectors and names that must meet something: Services, HPAs, PDBs, ServiceMonitors, NetworkPolicies,
    ConfigMap references; and no Secret object at all (secret values are never committed)."""
    problems = [
        f"{named(d)}: secret values must not be committed; reference the Secret by name"
        for d in of_kind(docs, "Secret")
    ]
    for svc in of_kind(docs, "Service"):
        pods = pods_selected(docs, svc["spec"].get("selector") or {}, plain=True)
        if not pods:
            problems.append(f"{named(svc)}: selector matches no pod template")
            continue
        for port in svc["spec"].get("ports") or []:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str) and not any(target in container_ports(t) for t in pods):
                problems.append(f"{named(svc)}: targetPort {target!r} is no container port of its pods")
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        if find(docs, ref["kind"], ref["name"]) is None:
            problems.append(f"{named(hpa)}: scales {ref['kind']}/{ref['name']}, which is not in the output")
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        if not pods_selected(docs, pdb["spec"]["selector"]):
            problems.append(f"{named(pdb)}: selector matches no pod template")
    for monitor in of_kind(docs, "ServiceMonitor"):
        services = [
            s
            for s in of_kind(docs, "Service")
            if selector_matches(monitor["spec"]["selector"], s["metadata"].get("labels") or {})
        ]
        for endpoint in monitor["spec"]["endpoints"]:
            if not any(p.get("name") == endpoint.get("port") for s in services for p in s["spec"]["ports"]):
                problems.append(f"{named(monitor)}: no selected Service has a port named {endpoint.get('port')!r}")
    for policy in of_kind(docs, "NetworkPolicy"):
        selector = policy["spec"]["podSelector"]
        pods = pods_selected(docs, selector)
        if selector and not pods:
            problems.append(f"{named(policy)}: podSelector matches no pod template")
        for rule in policy["spec"].get("ingress") or []:
            for port in rule.get("ports") or []:
                if isinstance(port.get("port"), str) and not all(port["port"] in container_ports(t) for t in pods):
                    problems.append(f"{named(policy)}: port {port['port']!r} is not a named port of every pod")
    for _, template in pod_templates(docs):
        for container in template["spec"]["containers"]:
            for source in container.get("envFrom") or []:
                ref = source.get("configMapRef")
                if ref and find(docs, "ConfigMap", ref["name"]) is None and not ref.get("optional"):
                    problems.append(f"container {container['name']}: ConfigMap {ref['name']!r} is not in the output")
    return problems


def config_problems(
    docs: Sequence[Doc], config_for: Callable[[str], type | None], make_file: Callable[[], str]
) -> list[str]:
    """Parse each container's effective MIST_* settings with its server's real config class (unknown names,
    malformed values and cross-field rules fail here instead of in a crash-looping pod). `config_for` maps a
    container name to its config class (None: skip); `make_file` returns a path to an existing file, standing
    in for mounted files (weights, token files, certificates)."""
    problems = []
    for workload, template in pod_templates(docs):
        for container in template["spec"]["containers"]:
            cls = config_for(container["name"])
            if cls is None:
                continue
            env = {k: (make_file() if v.startswith("/") else v) for k, v in effective_env(docs, container).items()}
            try:
                parse_config(cls, [], env)
            except Exception as error:  # ConfigError, InvalidArgumentError: both name the setting
                problems.append(f"{named(workload)} container {container['name']}: {error}")
    return problems


# ---------------------------------------------------------------------------------------------- network policy


def ingress_allowed(
    docs: Sequence[Doc],
    *,
    dst_labels: Mapping[str, str],
    dst_namespace: str,
    port: str,
    src_labels: Mapping[str, str],
    src_namespace: str,
    src_namespace_labels: Mapping[str, str] | None = None,
) -> bool:
    """Whether the NetworkPolicies in `docs` let a pod (src) open a connection to a named port of another (dst).
    Supports what mist uses: podSelector / namespaceSelector peers (no ipBlock) and named or omitted ports."""
    ns_labels = {"kubernetes.io/metadata.name": src_namespace, **(src_namespace_labels or {})}
    isolating = [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if p["metadata"].get("namespace", dst_namespace) == dst_namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selector_matches(p["spec"]["podSelector"], dst_labels)
    ]
    if not isolating:
        return True  # no policy selects the pod: it is not isolated
    for policy in isolating:
        for rule in policy["spec"].get("ingress") or []:
            port_ok = not rule.get("ports") or any(p.get("port") in (None, port) for p in rule["ports"])
            peers = rule.get("from")
            if port_ok and (
                not peers
                or any(_peer_matches(peer, dst_namespace, src_labels, src_namespace, ns_labels) for peer in peers)
            ):
                return True
    return False


def _peer_matches(
    peer: Doc, policy_namespace: str, src_labels: Mapping[str, str], src_namespace: str, ns_labels: Mapping[str, str]
) -> bool:
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        ns_ok = selector_matches(peer["namespaceSelector"], ns_labels)
    else:
        ns_ok = src_namespace == policy_namespace  # a bare podSelector means the policy's own namespace
    return ns_ok and selector_matches(peer.get("podSelector"), src_labels)


# ---------------------------------------------------------------------------------------------- Dockerfiles


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction with its continuation lines joined."""

    keyword: str  # upper case: FROM, RUN, USER, ...
    args: str  # the rest of the instruction, on one line


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order (comments and blank lines dropped, `\\` continuations joined; no heredocs)."""
    instructions, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, even inside a continuation
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return instructions


def _substitute(text: str, args: Mapping[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def dockerfile_problems(
    text: str, *, base: str = "python:3.11-slim", must_not_import: Sequence[str] = (), user: int = RUN_AS_USER
) -> list[str]:
    """Multi-stage, every external base image `base[-variant]` pinned by tag or digest and the same in every
    stage, a final stage that only copies (no pip, no compilers) and runs as `user` with an exec-form
    ENTRYPOINT, and for each of `must_not_import` a build step proving the final image cannot import it."""
    instructions = parse_dockerfile(text)
    global_args = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            global_args[name.strip()] = value.strip().strip("\"'")
    stages: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    if len(stages) < 2:
        return ["needs a multi-stage build (a build stage and a runtime stage without build tools)"]
    problems, aliases, bases = [], set(), set()
    for stage in stages:
        words = [w for w in stage[0].args.split() if not w.startswith("--")]
        image = _substitute(words[0], global_args)
        if len(words) >= 3 and words[1].upper() == "AS":
            aliases.add(words[2])
        if image in aliases:
            continue
        bases.add(image)
    for image in sorted(bases):
        name, _, tag = image.split("@")[0].rpartition(":")
        if "@sha256:" not in image and (not name or tag == "latest"):
            problems.append(f"base image {image!r} must be pinned by tag or digest")
        elif not image.startswith(base):
            problems.append(f"base image {image!r} must be {base}[-variant] (the build and runtime stages share it)")
    if len(bases) > 1:
        problems.append(f"stages use different base images {sorted(bases)}: the copied venv needs the same Python")
    return problems + _final_stage_problems(stages[-1], must_not_import, user)


def _final_stage_problems(stage: Sequence[Instruction], must_not_import: Sequence[str], user: int) -> list[str]:
    problems = []
    runs = [ins.args for ins in stage if ins.keyword == "RUN"]
    users = [ins.args for ins in stage if ins.keyword == "USER"]
    if not users or users[-1].split(":")[0] != str(user):
        problems.append(f"the final stage must end as USER {user} (numeric, so runAsNonRoot can verify it)")
    if any(re.search(r"\b(gcc|g\+\+|clang|build-essential|make|[\w.+-]+-dev)\b", r) and "install" in r for r in runs):
        problems.append("the final stage must not install compilers or -dev packages")
    if any(re.search(r"\bpip3?\s+install\b|-m\s+pip\s+install\b", r) for r in runs):
        problems.append("the final stage must not pip install: it copies the build stage's virtualenv")
    for module in must_not_import:
        proof = re.compile(rf"!\s*python3?\s+-c\s+[\"']import {re.escape(module)}[\"']")
        if not any(proof.search(r) for r in runs):
            problems.append(
                f'the final stage needs `RUN ! python -c "import {module}"` (the image must not contain {module})'
            )
    entry = [ins.args for ins in stage if ins.keyword in ("ENTRYPOINT", "CMD")]
    if not entry or not entry[0].startswith("["):
        problems.append("the final stage needs an exec-form ENTRYPOINT (JSON array) so SIGTERM reaches the server")
    return problems


def dockerfile_exposes(text: str) -> set[int]:
    """Ports of EXPOSE instructions (documentation the manifests are checked against)."""
    return {
        int(p.split("/")[0]) for ins in parse_dockerfile(text) if ins.keyword == "EXPOSE" for p in shlex.split(ins.args)
    }
