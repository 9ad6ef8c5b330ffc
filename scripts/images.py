"""Build the container images from deploy/docker/*.Dockerfile, also on a machine that reaches no container registry.

    .venv/bin/python scripts/images.py                 # make images: registry, device, tuner, extractor; prints sizes
    .venv/bin/python scripts/images.py --only registry,tuner
    .venv/bin/python scripts/images.py lock            # regenerate deploy/docker/constraints.txt (pip-compile)

The same Dockerfiles users with a registry build (`docker build -f deploy/docker/X.Dockerfile .`), with build args:
- `PYTHON_IMAGE`: `python:3.11-slim-bookworm` when it can be pulled (or is present); otherwise a base made here from
  Debian packages (`mmdebstrap --variant=apt` with python3, python3-venv, python-is-python3 and ca-certificates,
  then `docker import`), tagged `mist-base:bookworm` and reused by later runs.
- `PIP_INDEX_URL`, `PIP_TRUSTED_HOST`, `TORCH_INDEX_URL`: a wheelhouse served over HTTP to the build on the
  Docker bridge. The host downloads every pinned wheel with its own pip configuration (its indexes and CA
  bundle: pip inside a build has neither), so a build needs no network beyond the bridge and two builds install
  the same versions: deploy/docker/constraints.txt pins everything but torch, whose versions are the build args
  in IMAGES below (the tuner: the CPU build devices run; the extractor: the pair the Makefile installs).
Starts the Docker engine when none answers, and stops what it started (the engine, the wheelhouse server) on exit,
also on failure; the images stay.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCKER_DIR = ROOT / "deploy" / "docker"
CONSTRAINTS = DOCKER_DIR / "constraints.txt"
WORK_DIR = ROOT / "var" / "images"  # wheelhouse, base rootfs, engine log (git-ignored under var/)
DEFAULT_BASE = "python:3.11-slim-bookworm"
LOCAL_BASE = "mist-base:bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
VERSION = "0.1.0"
WHEELHOUSE_PORTS = range(18300, 18310)  # tried in turn for the wheelhouse server, then any free port
# Never pinned in constraints.txt: each image installs its own build of torch from TORCH_INDEX_URL, and a torch
# build pins its own CUDA runtime wheels exactly (its metadata says `nvidia-cudnn-cu13==9.24.0.43`, ...), which
# differ between builds of one version.
TORCH_FAMILY = ("torch", "torchvision")
TORCH_BUILD_PREFIXES = ("nvidia-", "cuda-", "triton")


@dataclass(frozen=True)
class Image:
    name: str  # deploy/docker/<name>.Dockerfile, tagged mist-<name>:VERSION
    extra: str  # the pyproject extra the image installs
    torch: tuple[str, ...] = ()  # requirement strings pulled into the wheelhouse for it
    build_args: dict[str, str] = field(default_factory=dict)  # beyond the base and the indexes


IMAGES: tuple[Image, ...] = (
    Image("registry", "registry"),
    Image("device", "device"),  # predict only: the numpy runtime, no torch
    Image("tuner", "tuner", ("torch==2.13.0+cpu",), {"TORCH_VERSION": "2.13.0+cpu"}),
    Image(
        "extractor",
        "extractor",
        ("torch==2.14.1", "torchvision==0.29.1"),
        {"TORCH_VERSION": "2.14.1", "TORCHVISION_VERSION": "0.29.1"},
    ),
)


class ImageError(RuntimeError):
    pass


def run(command: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, check=True, text=True, **kwargs)  # type: ignore[call-overload]


def docker_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@contextlib.contextmanager
def docker_engine() -> Iterator[None]:
    """The running engine, or one started here (dockerd in the background) and stopped on exit."""
    if shutil.which("docker") is None:
        raise ImageError("no docker CLI: apt-get install docker.io (or install Docker Engine)")
    if docker_answers():
        yield
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise ImageError("the Docker engine is not running and dockerd is not installed: apt-get install docker.io")
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    with open(WORK_DIR / "dockerd.log", "ab") as log:
        process = subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not docker_answers():
            if process.poll() is not None or time.monotonic() > deadline:
                raise ImageError(f"dockerd did not start: see {WORK_DIR / 'dockerd.log'}")
            time.sleep(0.5)
        print(f"started dockerd (pid {process.pid}); it is stopped when this run ends", flush=True)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def base_image(requested: str | None) -> str:
    """The base both stages build FROM: the one asked for, the default when it can be had, else a local one."""
    if requested:
        return requested
    if (
        image_exists(DEFAULT_BASE)
        or subprocess.run(["docker", "pull", DEFAULT_BASE], capture_output=True).returncode == 0
    ):
        return DEFAULT_BASE
    if image_exists(LOCAL_BASE):
        return LOCAL_BASE
    if shutil.which("mmdebstrap") is None:
        raise ImageError(f"{DEFAULT_BASE} cannot be pulled and mmdebstrap is missing: apt-get install mmdebstrap")
    print(f"{DEFAULT_BASE} cannot be pulled: making {LOCAL_BASE} from Debian packages", flush=True)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    rootfs = WORK_DIR / "rootfs.tar"
    run(["mmdebstrap", "--variant=apt", f"--include={','.join(BASE_PACKAGES)}", "bookworm", str(rootfs)])
    try:
        run(["docker", "import", "--change", 'CMD ["python"]', str(rootfs), LOCAL_BASE])
    finally:
        rootfs.unlink(missing_ok=True)
    return LOCAL_BASE


def fill_wheelhouse(images: Sequence[Image]) -> Path:
    """Every wheel the images install, downloaded by the host's pip, as a PEP 503 index under WORK_DIR/simple."""
    wheelhouse = WORK_DIR / "wheelhouse"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    # pip builds the project itself inside the image, in isolation: its build backend must be in the wheelhouse too.
    with open(ROOT / "pyproject.toml", "rb") as file:
        build_requires = tomllib.load(file)["build-system"]["requires"]
    run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(wheelhouse),
         "--constraint", str(CONSTRAINTS), *build_requires], cwd=ROOT)  # fmt: skip
    for image in images:
        requirements = [f".[{image.extra}]", *image.torch]
        run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(wheelhouse),
             "--constraint", str(CONSTRAINTS), *requirements], cwd=ROOT)  # fmt: skip
    for built in wheelhouse.glob("mist_suite-*"):  # the project itself is built inside the image
        built.unlink()
    return write_simple_index(wheelhouse, WORK_DIR / "simple")


def write_simple_index(wheelhouse: Path, simple: Path) -> Path:
    shutil.rmtree(simple, ignore_errors=True)
    projects: dict[str, list[str]] = {}
    for wheel in sorted(wheelhouse.iterdir()):
        if wheel.suffix in (".whl", ".gz", ".zip"):
            name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
            projects.setdefault(name, []).append(wheel.name)
    for name, files in projects.items():
        (simple / name).mkdir(parents=True)
        links = "".join(f'<a href="../../wheelhouse/{file}">{file}</a><br>\n' for file in files)
        (simple / name / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    return simple


def bridge_address() -> str:
    """The host's address on Docker's default bridge, where a build's RUN steps can reach it: the gateway, or when
    the engine does not report one, the first address of the bridge's subnet (where Docker puts it)."""
    config = json.loads(
        subprocess.run(
            ["docker", "network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
    )
    for entry in config or []:
        if entry.get("Gateway"):
            return str(entry["Gateway"])
        if entry.get("Subnet") and ipaddress.ip_network(entry["Subnet"]).version == 4:
            return str(ipaddress.ip_network(entry["Subnet"])[1])
    raise ImageError(f"cannot find the Docker bridge's address in {config!r}")


@contextlib.contextmanager
def serve(directory: Path, host: str) -> Iterator[str]:
    """WORK_DIR over HTTP on `host`, port chosen by the kernel, for the duration; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = None
    # A fixed port when free: the index URL is a build arg, part of every later RUN step's cache key, so a new
    # port each run would rebuild every layer (the extractor's 6 GB venv included) for nothing.
    for port in (*WHEELHOUSE_PORTS, 0):
        with contextlib.suppress(OSError):
            server = http.server.ThreadingHTTPServer((host, port), handler)
            break
    assert server is not None  # port 0 always binds
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def build(image: Image, base: str, index_url: str, host: str) -> int:
    tag = f"mist-{image.name}:{VERSION}"
    args = {"PYTHON_IMAGE": base, "PIP_INDEX_URL": f"{index_url}/simple", "PIP_TRUSTED_HOST": host,
            "TORCH_INDEX_URL": f"{index_url}/simple", **image.build_args}  # fmt: skip
    command = ["docker", "build", "-f", str(DOCKER_DIR / f"{image.name}.Dockerfile"), "-t", tag]
    for key, value in args.items():
        command += ["--build-arg", f"{key}={value}"]
    started = time.monotonic()
    run([*command, str(ROOT)], env={**os.environ, "DOCKER_BUILDKIT": "0"})  # the classic builder needs no registry
    size = int(subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", tag], capture_output=True,
                              text=True, check=True).stdout)  # fmt: skip
    print(f"built {tag} in {time.monotonic() - started:.0f} s: {size / 1e6:,.0f} MB", flush=True)
    return size


def build_images(names: Sequence[str], base: str | None) -> dict[str, int]:
    chosen = [image for image in IMAGES if image.name in names]
    sizes: dict[str, int] = {}
    with docker_engine():
        base_tag = base_image(base)
        fill_wheelhouse(chosen)
        host = bridge_address()
        with serve(WORK_DIR, host) as url:
            for image in chosen:
                sizes[image.name] = build(image, base_tag, url, host)
    print(f"\n{'image':<24} {'size':>10}")
    for name, size in sizes.items():
        print(f"{'mist-' + name + ':' + VERSION:<24} {size / 1e6:>7,.0f} MB")
    return sizes


def is_torch_build(name: str) -> bool:
    """torch, torchvision, or a wheel whose exact version the torch build itself dictates."""
    return name in TORCH_FAMILY or name.startswith(TORCH_BUILD_PREFIXES)


def lock() -> None:
    """deploy/docker/constraints.txt from pyproject.toml with pip-compile (pip-tools), torch's own pins left out."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "constraints.txt"
        extras = [arg for image in IMAGES for arg in ("--extra", image.extra)]
        run([sys.executable, "-m", "piptools", "compile", "--quiet", "--strip-extras", "--no-header",
             "--annotation-style", "line", *extras, "--output-file", str(out), "pyproject.toml"], cwd=ROOT)  # fmt: skip
        lines = []
        for line in out.read_text().splitlines():
            name = re.split(r"[=<>!~ ;\[]", line.strip(), maxsplit=1)[0].lower()
            if not line.strip() or line.startswith(("-", "#")) or is_torch_build(name):
                continue  # index options are the machine's, not the images'; torch comes from TORCH_INDEX_URL
            lines.append(line.rstrip())
    header = [
        "# Exact versions every image installs (pip's PIP_CONSTRAINT in deploy/docker/*.Dockerfile), for the",
        "# registry, tuner and extractor extras together. Generated by `scripts/images.py lock` (pip-compile);",
        "# torch and torchvision are not here: each image pins its build with TORCH_VERSION / TORCHVISION_VERSION,",
        "# and that build pins its CUDA wheels (nvidia-*, cuda-*, triton) exactly in its own metadata.",
    ]
    CONSTRAINTS.write_text("\n".join([*header, *lines]) + "\n")
    print(f"wrote {CONSTRAINTS.relative_to(ROOT)} ({len(lines)} pins)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=("build", "lock"), default="build")
    parser.add_argument("--only", default=",".join(image.name for image in IMAGES), help="images, comma-separated")
    parser.add_argument("--base", help=f"base image for both stages (default: {DEFAULT_BASE}, else {LOCAL_BASE})")
    args = parser.parse_args(argv)
    try:
        if args.command == "lock":
            lock()
            return 0
        names = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(names) - {image.name for image in IMAGES})
        if unknown:
            raise ImageError(f"unknown image(s) {unknown}: expected some of {[image.name for image in IMAGES]}")
        build_images(names, args.base)
    except (ImageError, subprocess.CalledProcessError) as error:
        print(f"images: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
