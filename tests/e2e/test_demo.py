"""`make demo`, the suite's main job, end to end: the command its recipe runs (read with `make -n`), with a short
profile (2 epochs, a temporary work folder): registry, extractor and worker start, the synthetic task is tuned with
--k auto, promoted and predicted by alias (here and through the worker), the accuracy against chance and the
transfer table are printed, and every server it started is stopped by the time it exits.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.process import ROOT, LineWatcher, child_environment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EPOCHS = 2  # the least the demo takes; measured 0.300 held-out accuracy on 160 images (chance 0.125), 34 s wall
ABOVE_CHANCE = 0.2  # 1.6x chance; the run is seeded, so the margin covers other torch builds, not luck
SERVER_MODULES = ["services.extractor.server", "services.registry.server", "services.tuner.server"]
# The demo backbone (32 px, 4 px patches: 65 tokens x 64 dims, 6 blocks): float32 bytes per image of each method.
FLOAT32_TOKENS = 65 * 64 * 4
BASELINES = {
    "MIST uncompressed (float32)": FLOAT32_TOKENS,
    "LST": 7 * FLOAT32_TOKENS,  # x_0 and the 6 blocks' outputs
    "LAST": 66_560,
    "Partial-1": FLOAT32_TOKENS,
    "linear probing (CLS only)": 64 * 4,
}


def make_demo_command() -> list[str]:
    """What `make demo` runs, from its recipe (make -n prints the setup steps too, without running them)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed: the demo's recipe cannot be read")
    dry = subprocess.run(
        ["make", "-n", "--no-print-directory", "demo", f"PY={sys.executable}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    [line] = [line for line in dry.stdout.splitlines() if "services.tuner.cli" in line]
    return shlex.split(line)


def children(pid: int) -> dict[int, list[str]]:
    """PID -> argv of every process whose parent is `pid`, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == pid:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().decode().split("\0")[:-1]
    return found


def running(pid: int, argv: list[str]) -> bool:
    """The process still exists with that argv (not a later process that got the same PID)."""
    try:
        return (Path(f"/proc/{pid}") / "cmdline").read_bytes().decode().split("\0")[:-1] == argv
    except OSError:
        return False


def test_make_demo_tunes_promotes_predicts_reports_and_stops_every_server(tmp_path: Path) -> None:
    # Prepare: `make demo`'s own command, short profile, its work folder here
    command = make_demo_command()
    assert command == [sys.executable, "-m", "services.tuner.cli", "demo"]
    workdir = tmp_path / "demo"
    with (tmp_path / "stderr.log").open("w") as stderr:
        demo = subprocess.Popen(
            [*command, "--epochs", str(EPOCHS), "--workdir", str(workdir)],
            cwd=ROOT, env=child_environment(), stdout=subprocess.PIPE, stderr=stderr, text=True,
        )  # fmt: skip
    stdout = LineWatcher(demo.stdout, "demo-stdout")
    servers: dict[int, list[str]] = {}
    try:
        # Execute: once the registry and extractor listen and the worker was started, note the demo's children
        stdout.wait_for("writing the synthetic dataset", timeout_s=180)
        servers = children(demo.pid)
        code = demo.wait(timeout=240)
        lines = stdout.join()
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGTERM)  # the demo stops its servers on SIGTERM as on Ctrl-C
            with contextlib.suppress(subprocess.TimeoutExpired):
                demo.wait(timeout=30)
        for pid, argv in servers.items():  # whatever it left behind, by PID
            if running(pid, argv):
                os.kill(pid, signal.SIGKILL)
    left_running = [argv[2] for pid, argv in servers.items() if running(pid, argv)]
    text = "\n".join(lines)
    stderr_tail = (tmp_path / "stderr.log").read_text()[-3000:]

    # Assert: exit 0, the three servers it started, all gone when it returned
    assert code == 0, text + "\n" + stderr_tail
    assert sorted(argv[2] for argv in servers.values()) == SERVER_MODULES, servers
    assert left_running == []
    assert re.search(r"stopped mist-registry, mist-extractor, mist-tuner \(logs in .*/logs\)$", lines[-1]), lines[-1]
    # ... the tune: version 1 of the new task, k chosen on validation, promoted
    assert re.search(r"^task shapes: version 1 \(parent -, task created\), k=\d chosen on validation$", text, re.M)
    assert "  alias production: - -> 1" in lines
    # ... predictions by alias, here and through the worker, which agrees on every image
    right = next(line for line in lines if re.search(r"\] \d+ of 8 right with version 1 \(k=\d, i8o-zstd\)", line))
    assert right.endswith("the worker, running the same code, agrees on every image"), right
    # ... the held-out accuracy, clearly above the 1/8 chance
    accuracy = re.search(r"held-out test accuracy (\d\.\d+) on 160 images, chance 0\.125 \((\d+\.\d)x chance\)", text)
    assert accuracy is not None, text
    assert float(accuracy.group(1)) >= ABOVE_CHANCE
    # ... and the transfer table: what MIST received, against the float32 size of every other method
    rows = dict(re.findall(r"^  (\S.*?\S)  +([\d,]+)  +\d+\.\d\dx$", text, re.M))
    received = next(int(size.replace(",", "")) for name, size in rows.items() if name.startswith("MIST as received"))
    assert {name: int(size.replace(",", "")) for name, size in rows.items() if name in BASELINES} == BASELINES
    assert 0 < received < FLOAT32_TOKENS // 3  # i8 + zstd: about a quarter of float32 (measured 4,327 B)


SEGMENTATION_EPOCHS = 15
# Answering "background" everywhere scores about 0.24 here; measured 0.625 after the demo's 30 epochs.
SEGMENTATION_MIN_MIOU = 0.40


def test_mist_demo_task_segmentation_tunes_a_pvt_v2_writes_label_maps_and_stops_its_servers(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    with (tmp_path / "stderr.log").open("w") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "services.tuner.cli", "demo", "--task", "segmentation", "--epochs",
             str(SEGMENTATION_EPOCHS), "--workdir", str(workdir)],
            cwd=ROOT, env=child_environment(), stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=240,
        )  # fmt: skip
    text = done.stdout
    assert done.returncode == 0, text + (tmp_path / "stderr.log").read_text()[-3000:]
    assert re.search(r"stopped mist-registry, mist-extractor \(logs in .*/logs\)$", text.strip()), text[-300:]
    assert "pushed scenes version 1 (segmentation, 4 classes, 70,340 parameters, 4.8 M MACs per image)" in text
    assert "  alias production: - -> 1" in text
    miou = re.search(r"held-out mIoU (\d\.\d+) and pixel accuracy (\d\.\d+) on 60 images \(32x32 labels\)", text)
    assert miou is not None and float(miou.group(1)) >= SEGMENTATION_MIN_MIOU, text
    # label maps and overlays for the 4 predicted images, at their own size (the synthetic pictures are 96 px)
    out = workdir / "segmentation-out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{i:05d}.labels.png" for i in range(4)] + [f"{i:05d}.overlay.png" for i in range(4)]
    )
    from PIL import Image

    assert {Image.open(p).size for p in out.iterdir()} == {(96, 96)}
    # the transfer table: every stage's output against the aggregate, float32 sizes from Describe (256 px, pvt_v2_b0)
    rows = dict(re.findall(r"^  (\S.*?\S)  +([\d,]+)  +\d+\.\d\dx$", text, re.M))
    assert rows["MIST aggregate uncompressed (float32)"] == rows["last stage only (frozen encoder)"] == "65,536"
    assert rows["every stage's output (side network, LST-like)"] == "1,015,808"
    assert 0 < int(rows["MIST aggregate as received"].replace(",", "")) < 65_536 // 3
    # nothing it started is left: no process still runs with this work folder in its arguments
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _mentions(p, str(workdir))]
    assert leftovers == []


def _mentions(proc: Path, text: str) -> bool:
    with contextlib.suppress(OSError):
        return text in (proc / "cmdline").read_bytes().decode(errors="replace")
    return False
