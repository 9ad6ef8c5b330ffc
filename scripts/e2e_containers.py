"""The suite in its containers: registry, extractor and tuner worker on a user-defined Docker network, with the
settings the Kubernetes manifests give them, driven from the host and from a device container.

    .venv/bin/python scripts/e2e_containers.py        # make e2e-containers (after make images)

What it does, and checks (any failure exits 1 after cleaning up):
1. Starts the Docker engine when none answers (and stops it at the end).
2. Starts the three images (`make images`) as containers on a network of their own, each with the MIST_*
   environment of deploy/k8s/base (its ConfigMap env file and literal `env` values), the pod security context
   (uid 10001, read-only root filesystem, every capability dropped, no privilege escalation, a tmpfs /tmp) and
   the Service names as network aliases, so MIST_EXTRACTOR=mist-extractor-headless:50051 resolves unchanged.
   The registry keeps SQLite on a named volume at /data and runs with auth on (an admin token file mounted
   read-only, as the Secret is), and the worker's registry token is mounted where the manifest says. The one
   test-sized difference: a small random-init ViT instead of ViT-B/16 weights (nothing can be downloaded).
3. Waits for grpc.health.v1 SERVING on each, from the host.
4. From the host: `mist tune` (promoting to `production`) and `mist predict`; the worker's Tune over gRPC.
5. From a device container (the tuner image: CPU torch, no timm), under the budget: `mist tune` with
   --memory 512m --cpus 1, `mist predict --runtime numpy` with --memory 128m --cpus 1, and the same predict in
   the predict-only device image (no torch); each peak memory measured from the container's cgroup. Then a tune
   under 100m must fail loudly: the kernel's OOM kill, reported by docker (exit 137, OOMKilled), not a hang.
6. Pushes in a loop, SIGKILLs the registry container mid-push, starts it again on the same volume: every
   acknowledged version must be there.
7. Stops and removes every container, the network and the volume it made, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.images import VERSION, ImageError, docker_engine, image_exists  # noqa: E402
from services.common.pb import tuner_pb2, tuner_pb2_grpc  # noqa: E402
from services.tuner.synthetic import CLASS_NAMES, SplitSizes, generate_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
K8S_BASE = ROOT / "deploy" / "k8s" / "base"
UID = "10001:10001"
SECURITY = ["--user", UID, "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--tmpfs", "/tmp:rw,size=512m,mode=1777"]  # fmt: skip
# Test-sized backbone: the manifests' ViT-B/16 needs weights from /models, which nothing here can download.
TINY_BACKBONE = {
    "MIST_BACKBONE": "vit_tiny_patch16_224",
    "MIST_MODEL_KWARGS": json.dumps({"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}),
    "MIST_WEIGHTS": "",
}
# The device's budget, and a limit clearly below what a tune needs (its measured peak is about 170 MiB).
DEVICE_TUNE_MEMORY, DEVICE_PREDICT_MEMORY, TOO_LITTLE_MEMORY = "512m", "128m", "100m"
KILL_AFTER_PUSHES = 6  # acknowledged pushes before the registry container is SIGKILLed mid-stream


class E2EError(RuntimeError):
    pass


@dataclass(frozen=True)
class Service:
    name: str  # deploy/k8s/base/<name>.yaml, image mist-<name>
    port: int  # gRPC
    alias: str  # the headless Service name other pods dial


SERVICES = (
    Service("registry", 50052, "mist-registry-headless"),
    Service("extractor", 50051, "mist-extractor-headless"),
    Service("tuner", 50053, "mist-tuner-headless"),
)


def manifest_env(name: str) -> dict[str, str]:
    """The container's MIST_* environment in deploy/k8s/base: the ConfigMap's env file, then literal `env`."""
    env: dict[str, str] = {}
    for line in (K8S_BASE / "config" / f"{name}.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    for document in yaml.safe_load_all((K8S_BASE / f"{name}.yaml").read_text()):
        if not document or document.get("kind") not in ("Deployment", "StatefulSet"):
            continue
        for container in document["spec"]["template"]["spec"]["containers"]:
            for entry in container.get("env", []):
                if "value" in entry:
                    env[entry["name"]] = str(entry["value"])
    return env


class Run:
    """Everything one run creates, labelled, so that cleanup finds it whatever happened."""

    def __init__(self, scratch: Path) -> None:
        self.id = f"mist-e2e-{os.getpid()}-{secrets.token_hex(3)}"
        self.scratch = scratch
        self.network = self.id
        self.volume = f"{self.id}-registry"
        self.figures: dict[str, object] = {}

    def docker(self, *args: str, check: bool = True, capture: bool = True) -> str:
        done = subprocess.run(["docker", *args], capture_output=capture, text=True)
        if check and done.returncode != 0:
            raise E2EError(
                f"docker {' '.join(args[:3])} ...: exit {done.returncode}: {(done.stderr or '').strip()[-500:]}"
            )
        return (done.stdout or "").strip()

    def logs(self, container: str, lines: int = 8) -> str:
        """The end of a container's output, stdout and stderr together (servers log to stderr)."""
        done = subprocess.run(["docker", "logs", "--tail", str(lines), container], capture_output=True, text=True)
        return (done.stdout + done.stderr).strip()

    def cleanup(self) -> None:
        ids = self.docker("ps", "-aq", "--filter", f"label=mist-e2e={self.id}", check=False).split()
        if ids:
            self.docker("rm", "-f", *ids, check=False)
        self.docker("network", "rm", self.network, check=False)
        self.docker("volume", "rm", "-f", self.volume, check=False)

    def start(self, service: Service, env: dict[str, str], mounts: Sequence[str]) -> str:
        args = ["run", "-d", "--name", f"{self.id}-{service.name}", "--label", f"mist-e2e={self.id}",
                "--network", self.network, "--network-alias", service.alias, *SECURITY]  # fmt: skip
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        for mount in mounts:
            args += ["--volume", mount]
        return self.docker(*args, f"mist-{service.name}:{VERSION}")

    def alive(self, container: str) -> str | None:
        """None while `container` runs; else its exit code and the end of its log."""
        if self.docker("inspect", "-f", "{{.State.Running}}", container) == "true":
            return None
        code = self.docker("inspect", "-f", "{{.State.ExitCode}}", container)
        return f"exit {code}: {self.logs(container)}"

    def address(self, container: str) -> str:
        return self.docker(
            "inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{self.network}").IPAddress}}}}', container
        )


def wait_serving(target: str, name: str, alive: Callable[[], str | None], timeout_s: float = 180.0) -> float:
    """Seconds until `target` answers SERVING; E2EError at once when its container has exited (with its log)."""
    started = time.monotonic()
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return time.monotonic() - started
            except grpc.RpcError:
                pass
            exited = alive()
            if exited is not None:
                raise E2EError(f"{name} exited before serving: {exited}")
            if time.monotonic() - started > timeout_s:
                raise E2EError(f"{name} at {target} was not SERVING after {timeout_s:.0f} s")
            time.sleep(0.5)


def host_cli(args: Sequence[str], what: str) -> str:
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "mist"), *args], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise E2EError(f"{what} failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
    return done.stdout


def worker_tune(target: str, dataset: Path, task: str) -> tuner_pb2.TuneEvent:
    """The worker's Tune over gRPC: a spec, then every labelled image; returns the final event (the version)."""

    def requests() -> Iterator[tuner_pb2.TuneRequest]:
        yield tuner_pb2.TuneRequest(spec=tuner_pb2.TuneSpec(task=task, k=2, epochs=2))
        for path in sorted(dataset.rglob("*.png")):
            split = {"train": tuner_pb2.SPLIT_TRAIN, "val": tuner_pb2.SPLIT_VAL, "test": tuner_pb2.SPLIT_TEST}.get(
                path.parent.parent.name, tuner_pb2.SPLIT_UNSPECIFIED
            )
            yield tuner_pb2.TuneRequest(image=tuner_pb2.LabelledImage(
                item_id=str(path.relative_to(dataset)), image=path.read_bytes(), label=path.parent.name, split=split))  # fmt: skip

    with grpc.insecure_channel(target) as channel:
        events = list(tuner_pb2_grpc.TunerStub(channel).Tune(requests(), timeout=900))
    final = events[-1] if events else None
    if final is None or not final.HasField("result"):
        raise E2EError(f"the worker's Tune ended without a version ({len(events)} events)")
    return final


def device_run(
    run: Run, memory: str, command: Sequence[str], mounts: Sequence[str], image: str = "tuner"
) -> tuple[int, bool, int, str]:
    """A device container (the tuner image, or the predict-only device image): `mist COMMAND` under
    --memory/--cpus 1 with the pod's security settings.

    Returns (exit code, OOM-killed, peak memory bytes from the cgroup, last output lines)."""
    args = ["run", "-d", "--label", f"mist-e2e={run.id}", "--network", run.network, "--memory", memory,
            "--memory-swap", memory, "--cpus", "1", *SECURITY, "--entrypoint", "mist"]  # fmt: skip
    for mount in mounts:
        args += ["--volume", mount]
    container = run.docker(*args, f"mist-{image}:{VERSION}", *command)
    peak = 0
    candidates = [Path(f"/sys/fs/cgroup/memory/docker/{container}/memory.max_usage_in_bytes"),
                  Path(f"/sys/fs/cgroup/system.slice/docker-{container}.scope/memory.peak")]  # fmt: skip
    deadline = time.monotonic() + 900
    while run.docker("inspect", "-f", "{{.State.Running}}", container) == "true":
        for path in candidates:
            with contextlib.suppress(OSError, ValueError):
                peak = max(peak, int(path.read_text()))
        if time.monotonic() > deadline:
            raise E2EError(f"device command {command[:2]} still running after 900 s")
        time.sleep(0.2)
    state = json.loads(run.docker("inspect", "-f", "{{json .State}}", container))
    logs = run.logs(container, 5)
    return int(state["ExitCode"]), bool(state["OOMKilled"]), peak, logs


def scenario(run: Run) -> None:
    wanted = [f"mist-{name}:{VERSION}" for name in (*(service.name for service in SERVICES), "device")]
    missing = [tag for tag in wanted if not image_exists(tag)]
    if missing:
        raise E2EError(f"images missing: {missing}: run `make images` first")
    run.docker("network", "create", "--label", f"mist-e2e={run.id}", run.network)
    run.docker("volume", "create", "--label", f"mist-e2e={run.id}", run.volume)
    # What the pod's fsGroup does in Kubernetes: the volume writable by uid 10001 (a root one-off, no network).
    run.docker("run", "--rm", "--label", f"mist-e2e={run.id}", "--network", "none", "--user", "0",
               "--volume", f"{run.volume}:/data", "--entrypoint", "chown", f"mist-registry:{VERSION}", UID, "/data")  # fmt: skip
    secrets_dir = run.scratch / "secrets"
    secrets_dir.mkdir()
    admin = secrets_dir / "admin-token"
    admin.write_text(secrets.token_urlsafe(32) + "\n")
    admin.chmod(0o644)  # read by uid 10001 inside, as a Secret volume's files are
    secrets_dir.chmod(0o755)
    dataset = run.scratch / "shapes"
    generate_dataset(dataset, classes=CLASS_NAMES[:4], sizes=SplitSizes(12, 4, 4), image_size=64, seed=0)
    run.scratch.chmod(0o755)

    started: dict[str, str] = {}
    envs = {}
    for service in SERVICES:
        env = manifest_env(service.name)
        mounts: list[str] = []
        if service.name == "registry":
            mounts = [f"{run.volume}:/data", f"{admin}:/etc/mist/registry-admin/token:ro"]
        if service.name == "extractor":
            env.update(TINY_BACKBONE, MIST_TORCH_THREADS="1")
        if service.name == "tuner":  # the Secret the manifest mounts; here the admin token (it may push any task)
            mounts = [f"{admin}:{env['MIST_REGISTRY_TOKEN_FILE']}:ro"]
        envs[service.name] = env
        started[service.name] = run.start(service, env, mounts)
    targets = {}
    for service in SERVICES:
        targets[service.name] = f"{run.address(started[service.name])}:{service.port}"
        seconds = wait_serving(targets[service.name], service.name, lambda c=started[service.name]: run.alive(c))
        run.figures[f"{service.name}_serving_after_s"] = round(seconds, 1)
    print(f"serving: {targets}", flush=True)
    uid = run.docker("exec", started["registry"], "id", "-u")
    if uid != "10001":
        raise E2EError(f"the registry runs as uid {uid}, not 10001")

    connection = ["--registry", targets["registry"], "--extractor", targets["extractor"], "--token-file", str(admin)]
    tuned = json.loads(host_cli(["tune", "--data", str(dataset), "--task", "e2e-host", "--k", "2", "--epochs", "3",
                                 "--alias", "production", "--json", "--progress", "quiet", *connection], "host mist tune"))  # fmt: skip
    run.figures["host_tune_version"] = tuned.get("version")
    images = sorted((dataset / "test").rglob("*.png"))[:4]
    predicted = host_cli(["predict", "--task", "e2e-host", "--alias", "production", "--progress", "quiet",
                          *connection, *map(str, images)], "host mist predict").splitlines()  # fmt: skip
    if len(predicted) != len(images):
        raise E2EError(f"host mist predict printed {len(predicted)} lines for {len(images)} images")
    run.figures["host_predictions"] = len(predicted)

    final = worker_tune(targets["tuner"], dataset, "e2e-worker")
    run.figures["worker_tune_version"] = final.result.number

    # The device: the tuner image, the dataset and the token mounted read-only, the extractor and registry by name.
    mounts = [f"{dataset}:/data:ro", f"{admin}:/run/token:ro"]
    by_name = ["--registry", "mist-registry-headless:50052", "--extractor", "mist-extractor-headless:50051",
               "--token-file", "/run/token", "--cache-dir", "/tmp/cache", "--progress", "quiet"]  # fmt: skip
    tune = ["tune", "--data", "/data", "--task", "e2e-device", "--k", "2", "--epochs", "3", "--alias", "production",
            *by_name]  # fmt: skip
    code, oom, peak, logs = device_run(run, DEVICE_TUNE_MEMORY, tune, mounts)
    if code != 0:
        raise E2EError(f"device tune under {DEVICE_TUNE_MEMORY} failed (exit {code}, OOM {oom}): {logs}")
    run.figures["device_tune_peak_mib"] = round(peak / 2**20, 1)
    predict = ["predict", "--task", "e2e-device", "--alias", "production", "--runtime", "numpy", *by_name,
               *(f"/data/{image.relative_to(dataset)}" for image in images)]  # fmt: skip
    for image in ("tuner", "device"):  # the device that tuned, then a predict-only one (no torch)
        code, oom, peak, logs = device_run(run, DEVICE_PREDICT_MEMORY, predict, mounts, image)
        if code != 0:
            raise E2EError(f"{image} predict under {DEVICE_PREDICT_MEMORY} failed (exit {code}, OOM {oom}): {logs}")
        run.figures[f"{image}_image_predict_peak_mib"] = round(peak / 2**20, 1)
    starved = ["tune", "--data", "/data", "--task", "e2e-starved", "--k", "2", "--epochs", "1", *by_name]
    code, oom, peak, logs = device_run(run, TOO_LITTLE_MEMORY, starved, mounts)
    if code == 0 or not oom:
        raise E2EError(f"a tune under {TOO_LITTLE_MEMORY} should be OOM-killed; got exit {code}, OOMKilled {oom}")
    run.figures["starved_tune"] = f"exit {code}, OOMKilled, peak {peak / 2**20:.0f} MiB of {TOO_LITTLE_MEMORY}"
    kill_registry_mid_push(run, started["registry"], targets["registry"], admin.read_text().strip())


def kill_registry_mid_push(run: Run, container: str, target: str, token: str) -> None:
    """Pushes in a loop, SIGKILLs the registry container while one is in flight, starts it again on the same
    volume: every version acknowledged before the kill must be there, with its bytes."""
    from services.common.clients.registry import RegistryClient

    acknowledged: dict[int, str] = {}
    failure = ""
    with RegistryClient(target, token=token, timeout_s=30) as client:
        blob = client.pull("e2e-host", version=1).blob
        latest = client.get_task("e2e-host").latest_version
        for push in range(KILL_AFTER_PUSHES * 4):
            if push == KILL_AFTER_PUSHES:
                # the kill lands while the next push streams: a background thread, so this one is mid-call
                threading.Timer(0.01, lambda: run.docker("kill", "--signal", "KILL", container)).start()
            try:
                version = client.push("e2e-host", blob, parent_version=latest, force=True, tags={"push": str(push)})
            except Exception as error:  # noqa: BLE001 - UNAVAILABLE (or another code) once the server is gone
                failure = f"{type(error).__name__}: {str(error)[:120]}"
                break
            acknowledged[version.number] = version.sha256
            latest = version.number
    if not failure:
        raise E2EError("the registry answered every push although it was killed")
    run.docker("start", container)
    wait_serving(target, "restarted registry", lambda: run.alive(container))
    with RegistryClient(target, token=token, timeout_s=30) as client:
        stored = {version.number: version.sha256 for version in client.list_versions("e2e-host")}
        for number in acknowledged:
            client.pull("e2e-host", version=number)  # the bytes too, checked against their sha256
    lost = {number: sha for number, sha in acknowledged.items() if stored.get(number) != sha}
    if lost:
        raise E2EError(f"versions acknowledged before the kill are missing after the restart: {sorted(lost)}")
    run.figures["registry_kill"] = (
        f"{len(acknowledged)} pushes acknowledged, then SIGKILL mid-push ({failure}); after a restart on the same "
        f"volume all {len(acknowledged)} are there with their bytes ({len(stored)} versions stored)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    started = time.monotonic()
    try:
        with docker_engine(), tempfile.TemporaryDirectory(prefix="mist-e2e-") as scratch:
            run = Run(Path(scratch))
            try:
                scenario(run)
            finally:
                run.cleanup()
    except (E2EError, ImageError, subprocess.CalledProcessError) as error:
        print(f"e2e-containers: FAILED: {error}", file=sys.stderr)
        return 1
    print(f"e2e-containers: passed in {time.monotonic() - started:.0f} s")
    for key, value in run.figures.items():
        print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
