"""Fixtures of the reliability suite: every test taking `scale` runs twice, short (unmarked, `make test`) and stress
(`@pytest.mark.stress`, `make stress`); figures are printed per test and summarised at the end of the session.

    MIST_STRESS_SCALE=0.1 pytest -m stress -s tests/reliability      # the stress code, ten times smaller
    MIST_FIGURES_FILE=/tmp/figures.jsonl pytest tests/reliability    # keep every figure as JSON lines
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from services.extractor.backbone import LoadedBackbone
from tests.helpers.extractor import ExtractorProcess, load_tiny_backbone
from tests.reliability import Figures, Scale, stress_factor

_SESSION_FIGURES: list[Figures] = []


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`scale` -> two runs of the same test: "short" and "stress" (the latter marked, so `make test` skips it)."""
    if "scale" in metafunc.fixturenames:
        factor = stress_factor()
        metafunc.parametrize(
            "scale",
            [
                pytest.param(Scale("short"), id="short"),
                # A stress run may outlast the suite's 300 s per-test timeout by design; it stops itself well before this.
                pytest.param(
                    Scale("stress", factor),
                    id="stress",
                    marks=[pytest.mark.stress, pytest.mark.timeout(max(3600, 3600 * factor))],
                ),
            ],
        )


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    """A test's figures: printed when it ends (pass or fail), listed again in the session summary."""
    recorded = Figures(request.node.nodeid.split("::", 1)[-1])
    yield recorded
    recorded.publish()
    if recorded.values:
        _SESSION_FIGURES.append(recorded)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _SESSION_FIGURES:
        terminalreporter.section("reliability figures")
        for recorded in _SESSION_FIGURES:
            terminalreporter.write_line(recorded.line())


@pytest.fixture(scope="session")
def tiny_backbone() -> LoadedBackbone:
    """The suite's tiny random ViT (seed 0), the same weights every extractor process of these tests loads."""
    return load_tiny_backbone()


@dataclass(frozen=True)
class RunningExtractor:
    """An extractor subprocess: where to reach it and its PID (for /proc memory readings)."""

    process: ExtractorProcess
    target: str  # 127.0.0.1:PORT
    metrics_url: str  # http://127.0.0.1:PORT/metrics

    @property
    def pid(self) -> int:
        return self.process.proc.pid


@pytest.fixture(scope="session")
def shared_extractor() -> Iterator[RunningExtractor]:
    """One `python -m services.extractor.server` for the load and hostile-input tests (its start costs seconds).

    The cache is off so every image runs the real path (decode, batch, forward, encode) however often it is sent;
    96 stream slots leave room for the 64-stream load run next to other clients.
    """
    process = ExtractorProcess("--cache-max-bytes", "0", "--max-streams", "96", "--grace-s", "1")
    try:
        target, metrics_port = process.wait_listening(timeout_s=120)
        yield RunningExtractor(process, target, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        process.stop()
