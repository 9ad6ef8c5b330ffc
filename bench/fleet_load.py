"""Fleet section, last part: a swap under a steady predict load through the extractor fails no prediction.

Method. A real extractor (the micro ViT: this measures the swap, not the backbone) and a real registry, each its own
process; a task whose edge network fits the extractor's features, with two versions of random (finite) weights; a
device `Agent` (services/tuner/agent.py) following `production` at version 1; a thread predicting one image after
another through the agent for the whole phase. Then a promote to version 2. Counted: predictions, failed ones
(target 0), every answer's version (only 1 before the agent swapped, only 2 after: no answer mixes them), and the
time from SetAlias to the agent's swap (its watch event, pull, strict load and smoke prediction included).
"""

from __future__ import annotations

import io
import tempfile
import threading
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import VIT_MICRO, Profile
from bench.servers import extractor_server
from services.common.clients.registry import RegistryClient
from services.common.wire.codec import DEFAULT_CODEC
from services.common.wire.edge_spec import EdgeNetworkConfig
from services.registry.records import Task
from services.tuner.agent import Agent, Backoff
from services.tuner.config import Endpoints
from services.tuner.edge_network import EdgeNetwork, to_safetensors_bytes

TASK, ALIAS = "fleet-load", "production"
CLASSES = ("a", "b", "c")
SETTLE_S = {"full": 3.0, "quick": 1.0, "smoke": 0.5}  # steady predictions before the promote, and after the swap
SWAP_TIMEOUT_S = 30.0


def _image(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _weights(config: EdgeNetworkConfig, seed: int) -> bytes:
    torch.manual_seed(seed)
    model = EdgeNetwork(config, zero_init_proj=False)  # random everywhere: the two versions answer differently
    return to_safetensors_bytes(model)


class _Load:
    """Predicts one image after another through the agent on a thread until stopped; records every answer."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.answers: list[tuple[float, int, bool]] = []  # (monotonic time, version, ok)
        self._stop = threading.Event()
        self._images = [_image(seed) for seed in range(16)]
        self._thread = threading.Thread(target=self._run, name="fleet-load", daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            prediction = self.agent.predict(self._images[n % len(self._images)], f"image-{n}")
            self.answers.append((time.monotonic(), prediction.version, prediction.ok))
            n += 1

    def __enter__(self) -> _Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def swap_under_load(profile: Profile, registry_factory: Any) -> dict[str, Any]:
    """The phase's figures; `registry_factory(db_url)` returns a started registry server (fleet.RegistryServer)."""
    settle_s = SETTLE_S[profile]
    with tempfile.TemporaryDirectory(prefix="mist-bench-fleet-load-") as scratch:
        registry = registry_factory(f"sqlite:///{scratch}/registry.db")
        extractor = extractor_server(VIT_MICRO, profile, metrics=False)
        try:
            extractor.start()
            endpoints = Endpoints(extractor=extractor.target, registry=registry.target, cache_dir=f"{scratch}/cache")
            with endpoints.extractor_client() as client:
                info = client.describe()
            config = EdgeNetworkConfig(dims=info.dims, tokens=info.tokens, num_classes=len(CLASSES))
            with RegistryClient(registry.target) as admin:
                admin.create_task(
                    Task(name=TASK, backbone_name=info.backbone.name,
                         backbone_fingerprint=info.backbone.weights_fingerprint, gather_mode="mist", k=1,
                         codec=DEFAULT_CODEC.name, class_names=CLASSES, edge=config.to_dict())
                )  # fmt: skip
                for number in (1, 2):
                    admin.push(TASK, _weights(config, number), parent_version=number - 1, tags={"k": "1"})
                admin.set_alias(TASK, ALIAS, 1)
                with Agent(endpoints, TASK, ALIAS, device="bench-device", state_dir=f"{scratch}/state",
                           backoff=Backoff(initial_s=0.1, max_s=1.0)) as agent:  # fmt: skip
                    with _Load(agent) as load:
                        time.sleep(settle_s)
                        promoted = time.monotonic()
                        admin.set_alias(TASK, ALIAS, 2)
                        status = agent.wait_for(lambda s: s.version == 2, SWAP_TIMEOUT_S)
                        swapped = time.monotonic()
                        time.sleep(settle_s)
                    changes = [c for c in status.changes if c.kind == "swap"]
        finally:
            extractor.stop()
            registry.stop()
    return _figures(load.answers, promoted, swapped, status.version, changes)


def _figures(
    answers: list[tuple[float, int, bool]], promoted: float, swapped: float, version: int, changes: list
) -> dict:
    failed = sum(not ok for _, _, ok in answers)
    first_new = next((t for t, v, _ in answers if v == 2), None)
    after_first_new = [v for t, v, _ in answers if first_new is not None and t >= first_new]
    before_promote = [v for t, v, _ in answers if t < promoted]
    during = [v for t, v, _ in answers if promoted <= t <= swapped]
    return {
        "predictions": len(answers),
        "failed": failed,
        "during_swap": len(during),
        "versions_seen": sorted({v for _, v, _ in answers}),
        "old_after_new": sum(v != 2 for v in after_first_new),  # an answer of 1 after one of 2: a mixed swap
        "before_promote_all_old": all(v == 1 for v in before_promote),
        "swap_s": swapped - promoted,
        "agent_swap_s": changes[-1].seconds if changes else None,
        "final_version": version,
        "predictions_per_s": len(answers) / max(1e-9, answers[-1][0] - answers[0][0]) if len(answers) > 1 else 0.0,
    }


def target(figures: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "a swap under a steady predict load through the extractor (device agent): failed predictions",
        "target": "= 0",
        "measured": f"{figures['failed']} of {figures['predictions']} ({figures['during_swap']} during the swap, "
        f"{figures['swap_s']:.2f} s from SetAlias); answers of the old version after the new one: "
        f"{figures['old_after_new']}",
        "passed": figures["failed"] == 0
        and figures["old_after_new"] == 0
        and figures["final_version"] == 2
        and figures["before_promote_all_old"],
    }
