"""Section 3: an edge link, for real. The extractor in one network namespace, the client in another, a veth pair
between them shaped with `tc qdisc tbf` (10 and 2 Mbit/s); wall time to deliver a training set's features for LST,
LAST, MIST float32 and MIST with the default codec. Needs root; skips, saying why, where it cannot run.

    python -m bench.run --only link
    python -m bench.link client --target HOST:PORT --image-dir DIR --device VETH \\
        --jobs '[{"mode": "mist", "codec": "i8o-zstd", "images": 40}]'
        (the client side, run by the section inside the client namespace; prints one JSON line)
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    MIB,
    ROOT,
    VIT_B16,
    VIT_MICRO,
    VIT_TI16,
    BackboneSpec,
    BenchError,
    Profile,
    child_env,
    run_streams,
)
from bench.netns import EdgeLink, TbfShape
from bench.servers import ServerProcess

VTAB_1K_IMAGES = 1000  # the training set the paper's transfer figures are about (800 train + 200 val)
_CLIENT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class LinkJob:
    """What one client run fetches."""

    method: str  # gather mode
    codec: str  # codec name
    label: str  # how the report names it


JOBS: tuple[LinkJob, ...] = (
    LinkJob("lst", "f32-none", "LST (float32)"),
    LinkJob("last", "f32-none", "LAST (float32)"),
    LinkJob("mist", "f32-none", "MIST float32"),
    LinkJob("mist", "i8o-zstd", "MIST default codec"),
)


@dataclass(frozen=True)
class LinkSettings:
    """Sizes of section 3."""

    backbone: BackboneSpec  # the served backbone: ViT-B/16 so that the bytes are the paper's
    rates_mbit: tuple[float, ...]  # link rates measured, each in its own pass
    distinct_images: int  # distinct PNG files; a run cycles through them (the server cache answers repeats)
    image_px: int  # side of the synthetic PNGs sent (the server resizes to its input size, as for any photo)
    target_seconds: float  # each run sends enough images to last about this long at the link rate
    min_images: int  # ... but at least this many
    max_images: int  # ... and at most this many


SETTINGS: dict[Profile, LinkSettings] = {
    "full": LinkSettings(
        VIT_B16, (10.0, 2.0), distinct_images=8, image_px=224, target_seconds=15.0, min_images=1, max_images=400
    ),
    # ViT-Ti/16: ViT-B/16's 12 blocks and 197 tokens at a quarter of the width, so a quarter of the bytes.
    "quick": LinkSettings(
        VIT_TI16, (10.0,), distinct_images=1, image_px=224, target_seconds=1.0, min_images=1, max_images=100
    ),
    "smoke": LinkSettings(
        VIT_MICRO, (10.0,), distinct_images=2, image_px=32, target_seconds=0.2, min_images=2, max_images=20
    ),
}

METHOD_TEXT = (
    "Two network namespaces created by the benchmark, joined by a veth pair with a private /30 of their own; "
    "`tc qdisc replace dev <veth> root tbf rate <R>mbit burst 32kbit latency 400ms` on both ends. The extractor "
    "(`ip netns exec <server-ns> python -m services.extractor.server`) serves the backbone on the server end; a "
    "client process in the client namespace (`python -m bench.link client`, one per rate) connects, then runs "
    "each method in turn: one stream of its images (32 in flight), timed from the first request to the last "
    "result, so the images going up and the features coming down both cross the shaped link. The server's "
    "cache is filled in an unshaped pass first, and each run cycles through a few distinct images: the timed "
    "runs measure the link, not the backbone (repeats are free on the server, which is fine here). Runs are a "
    "scaled subset (each sized to last about the target time, at least one image); **seconds for 1000 images** "
    "(a VTAB-1k training set) = seconds per image x 1000. **On the wire** = bytes the client's veth received "
    "during the run (Ethernet, IP and TCP headers included) per image; **ideal** = payload bits / rate."
)


def run(profile: Profile, out_dir: Path) -> dict[str, Any]:
    """BenchSkipped (from EdgeLink.create) where namespaces cannot be made; the link is always taken down."""
    from services.extractor.transfer import synthetic_png_images

    settings = SETTINGS[profile]
    link = EdgeLink.create()
    server: ServerProcess | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="mist-bench-link-") as image_dir:
            for index, image in enumerate(synthetic_png_images(settings.distinct_images, settings.image_px)):
                (Path(image_dir) / f"image-{index:03d}.png").write_bytes(image)
            server = ServerProcess(
                settings.backbone,
                listen=f"{link.server_address}:0",
                metrics=False,
                flags=["--cache-max-bytes", str(1 << 30), "--grace-s", "1"],
                prefix=link.exec_prefix("server"),
            ).start()
            warm = _clients(link, server.target, [(job, settings.distinct_images) for job in JOBS], image_dir)
            payload = {job: result["payload_bytes"] / result["images"] for job, result in zip(JOBS, warm, strict=True)}
            rows = []
            for rate in settings.rates_mbit:
                link.set_rate(TbfShape(rate))
                sizes = [(job, _images_for(settings, rate, payload[job])) for job in JOBS]
                results = _clients(link, server.target, sizes, image_dir)
                rows += [_row(job, rate, result) for (job, _), result in zip(sizes, results, strict=True)]
            link.set_rate(None)
    finally:
        if server is not None:
            server.stop()
        link.close()
    shape = TbfShape(settings.rates_mbit[0])
    return {
        "rows": rows,
        "backbone": settings.backbone.to_dict(),
        "distinct_images": settings.distinct_images,
        "image_px": settings.image_px,
        "tbf": {"burst_kbit": shape.burst_kbit, "latency_ms": shape.latency_ms},
        "addresses": {"server": link.server_address, "client": link.client_address},
        "scaled_subset": True,
        "server_cache_prewarmed": True,
        "method": METHOD_TEXT,
    }


def _images_for(settings: LinkSettings, rate_mbit: float, payload_per_image: float) -> int:
    """Enough images to keep the link busy for about `target_seconds`, within the settings' bounds."""
    images = math.ceil(settings.target_seconds * rate_mbit * 1e6 / 8 / payload_per_image)
    return max(settings.min_images, min(settings.max_images, images))


def _row(job: LinkJob, rate: float, result: dict[str, float]) -> dict[str, Any]:
    images, seconds = int(result["images"]), float(result["seconds"])
    payload = result["payload_bytes"] / images
    return {
        "method": job.method,
        "codec": job.codec,
        "label": job.label,
        "rate_mbit": rate,
        "images": images,
        "seconds": seconds,
        "seconds_per_image": seconds / images,
        "seconds_1000_images": seconds / images * VTAB_1K_IMAGES,
        "payload_bytes_per_image": payload,
        "wire_bytes_per_image": result["wire_bytes"] / images,
        "ideal_seconds_1000_images": payload * VTAB_1K_IMAGES / (rate * 1e6 / 8),
        "cache_hits": int(result["cache_hits"]),
    }


def _clients(link: EdgeLink, target: str, jobs: list[tuple[LinkJob, int]], image_dir: str) -> list[dict[str, float]]:
    """One `python -m bench.link client` process in the client namespace running `jobs` in turn; its results."""
    spec = json.dumps([{"mode": job.method, "codec": job.codec, "images": images} for job, images in jobs])
    command = [
        *link.exec_prefix("client"),
        sys.executable,
        "-m",
        "bench.link",
        "client",
        "--target",
        target,
        "--jobs",
        spec,
        "--image-dir",
        image_dir,
        "--device",
        link.devices["client"],
    ]
    result = subprocess.run(
        command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=_CLIENT_TIMEOUT_S
    )
    if result.returncode != 0:
        raise BenchError(f"the link client failed: {result.stderr.strip()[-800:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- client side


def client_main(argv: Sequence[str]) -> int:
    """The client side: each job streams its images (cycling through the files); prints one JSON list."""
    parser = argparse.ArgumentParser(prog="python -m bench.link client", description="timed edge-link runs")
    parser.add_argument("--target", required=True, help="the extractor, HOST:PORT")
    parser.add_argument("--jobs", required=True, help='JSON list of {"mode", "codec", "images"}, run in turn')
    parser.add_argument("--image-dir", type=Path, required=True, help="directory of the PNG files to send")
    parser.add_argument("--device", required=True, help="this namespace's veth, whose received bytes are counted")
    args = parser.parse_args(argv)
    from services.common.clients.extractor import ExtractorClient

    files = sorted(args.image_dir.glob("*.png"))
    if not files:
        parser.error(f"no PNG files in {args.image_dir}")
    counter = Path("/sys/class/net") / args.device / "statistics" / "rx_bytes"
    with ExtractorClient(args.target) as client:
        depth = client.describe(timeout_s=120).num_blocks
    results = []
    for job in json.loads(args.jobs):
        images = [files[i % len(files)].read_bytes() for i in range(int(job["images"]))]
        ks = (depth,) if job["mode"] == "mist" else ()
        received = int(counter.read_text())
        run = run_streams(args.target, [images], mode=job["mode"], ks=ks, codec=job["codec"], window=32)
        results.append(
            {
                "seconds": run.seconds,
                "images": run.images,
                "payload_bytes": run.payload_bytes,
                "wire_bytes": int(counter.read_text()) - received,
                "cache_hits": run.cache_hits,
            }
        )
    print(json.dumps(results))
    return 0


# ---------------------------------------------------------------------------------------------- report


def markdown(section: Mapping[str, Any]) -> str:
    rows: list[dict[str, Any]] = section["rows"]
    lines = [
        f"Backbone: {section['backbone']['label']}; {section['distinct_images']} distinct "
        f"{section['image_px']} px PNG images cycled; tbf burst {section['tbf']['burst_kbit']} kbit, "
        f"latency {section['tbf']['latency_ms']} ms.\n",
        "| method | rate Mbit/s | images sent | seconds | MiB/image payload | MiB/image on the wire | "
        "seconds for 1000 images | ideal (payload at rate) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} ({row['codec']}) | {row['rate_mbit']:g} | {row['images']} | "
            f"{row['seconds']:.1f} | {row['payload_bytes_per_image'] / MIB:.4f} | "
            f"{row['wire_bytes_per_image'] / MIB:.4f} | {_duration(row['seconds_1000_images'])} | "
            f"{_duration(row['ideal_seconds_1000_images'])} |"
        )
    return "\n".join(lines) + f"\n\n*Method.* {section['method']}"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds:,.0f} s ({seconds / 3600:.1f} h)"
    if seconds >= 120:
        return f"{seconds:,.0f} s ({seconds / 60:.1f} min)"
    return f"{seconds:.1f} s"


def plots(section: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """link.png: extrapolated seconds for 1000 images per method, one bar group per rate, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[dict[str, Any]] = section["rows"]
    rates = list(dict.fromkeys(float(row["rate_mbit"]) for row in rows))
    labels = list(dict.fromkeys(str(row["label"]) for row in rows))
    by_cell = {(row["label"], row["rate_mbit"]): float(row["seconds_1000_images"]) for row in rows}
    width = 0.8 / len(rates)
    fig, ax = plt.subplots(figsize=(8, 4))
    for index, rate in enumerate(rates):
        xs = [m + (index - (len(rates) - 1) / 2) * width for m in range(len(labels))]
        ax.bar(xs, [by_cell[(label, rate)] / 60 for label in labels], width, label=f"{rate:g} Mbit/s")
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("minutes for 1000 images (extrapolated)")
    ax.set_title("Delivering a VTAB-1k training set's features over a shaped link")
    ax.legend()
    fig.tight_layout()
    path = out_dir / "link.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        sys.exit(client_main(sys.argv[2:]))
    sys.exit("usage: python -m bench.link client ... (the section itself runs from `python -m bench.run`)")
