"""Progress of a tune for people: a live one-line bar on a terminal, plain log lines anywhere else.

Plugs into training's on_step / on_epoch callbacks and the extraction loop; `mist tune --quiet` silences it.
Hand-written rather than tqdm: the bar is one line, the log path is needed anyway, and devices install less.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from typing import Literal, TextIO

from services.common.errors import InvalidArgumentError
from services.tuner.training import EpochStats, KSelection, StepProgress

ProgressMode = Literal["auto", "bar", "log", "quiet"]
PROGRESS_MODES: tuple[ProgressMode, ...] = ("auto", "bar", "log", "quiet")
BAR_CELLS = 20  # width of the [####----] part
DEFAULT_MIN_INTERVAL_S = 0.1  # redraw the bar at most 10 times a second: a fast epoch must not flood a slow terminal
EXTRACTION_LOG_EVERY = 0.1  # log mode: one extraction line per 10 % of the images

logger = logging.getLogger("mist.tuner.progress")


def resolve_mode(mode: ProgressMode, stream: TextIO, environ: Mapping[str, str] | None = None) -> ProgressMode:
    """Resolve "auto": "bar" on an interactive terminal, else "log" (also under CI, NO_COLOR or TERM=dumb)."""
    if mode not in PROGRESS_MODES:
        raise InvalidArgumentError(f"progress mode must be one of {PROGRESS_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    env = os.environ if environ is None else environ
    if env.get("CI") or env.get("NO_COLOR") or env.get("TERM") == "dumb":
        return "log"
    isatty = getattr(stream, "isatty", None)
    return "bar" if callable(isatty) and isatty() else "log"


class ProgressReporter:
    """Receives extraction, step and epoch progress and shows it in the resolved mode.

    bar: redraws one line in place (throttled), then leaves one finished line per epoch;
    log: one INFO record per epoch (and per 10 % of extraction) on the "mist.tuner.progress" logger;
    quiet: nothing.
    """

    def __init__(
        self,
        mode: ProgressMode = "auto",
        *,
        stream: TextIO | None = None,
        log: logging.Logger | None = None,
        min_interval_s: float = DEFAULT_MIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.mode = resolve_mode(mode, self._stream, environ)
        self._log = log or logger
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._last_draw = -float("inf")
        self._drawn_chars = 0  # length of the bar line on screen; 0 when the cursor is at a line start
        self._extraction_logged = -1  # last 10 % bucket logged

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ events

    def on_extraction(self, done: int, total: int, feature_bytes: int) -> None:
        """`done` of `total` images extracted; `feature_bytes` received so far."""
        per_image = f"{feature_bytes / done / 1024:.1f} KiB/image" if done else "-"
        if self.mode == "bar":
            self._draw(f"extracting {_bar(done, total)} {done}/{total} images, {per_image}", final=done >= total)
        elif self.mode == "log":
            bucket = int(done / total / EXTRACTION_LOG_EVERY) if total else 0
            if bucket > self._extraction_logged or done >= total:
                self._extraction_logged = bucket
                self._log.info("extracted %d/%d images, %s", done, total, per_image)

    def on_step(self, progress: StepProgress) -> None:
        if self.mode != "bar":
            return
        line = (
            f"{_run_label(progress.phase, progress.k)} epoch {progress.epoch}/{progress.epochs} "
            f"{_bar(progress.step, progress.steps)} loss {progress.loss:.4f} acc {progress.accuracy:.1%} "
            f"{progress.images_per_second:.0f} img/s"
        )
        self._draw(line, final=False)

    def on_epoch(self, stats: EpochStats) -> None:
        line = format_epoch(stats)
        if self.mode == "bar":
            self._draw(line, final=True)
        elif self.mode == "log":
            self._log.info("%s", line)

    def on_k_selection(self, selection: KSelection) -> None:
        scores = ", ".join(f"k={k}: {acc:.1%}" for k, acc in sorted(selection.val_accuracy_by_k.items()))
        self.message(f"chose k={selection.chosen_k} on validation ({scores}; {selection.epochs} epochs each)")

    def message(self, text: str) -> None:
        """A line of its own (a bar in progress is cleared first and redrawn by the next update)."""
        if self.mode == "bar":
            self._clear()
            self._stream.write(text + "\n")
            self._stream.flush()
        elif self.mode == "log":
            self._log.info("%s", text)

    def close(self) -> None:
        """End an unfinished bar line so that what follows starts on a fresh line."""
        if self.mode == "bar" and self._drawn_chars:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn_chars = 0

    # ----------------------------------------------------------------------------------------- drawing

    def _draw(self, line: str, *, final: bool) -> None:
        now = self._clock()
        if not final and now - self._last_draw < self._min_interval_s:
            return
        self._last_draw = now
        if not final:  # a line redrawn in place must not wrap; a finished one may, the terminal folds it
            line = line[: max(10, shutil.get_terminal_size((100, 24)).columns - 1)]
        # Pad over the previous line's tail rather than sending an erase sequence: works on any terminal.
        self._stream.write("\r" + line.ljust(self._drawn_chars) + ("\n" if final else ""))
        self._stream.flush()
        self._drawn_chars = 0 if final else len(line)

    def _clear(self) -> None:
        if self._drawn_chars:
            self._stream.write("\r" + " " * self._drawn_chars + "\r")
            self._drawn_chars = 0


def format_epoch(stats: EpochStats) -> str:
    """One line per epoch, the same in both modes."""
    validation = (
        f", val acc {stats.val_accuracy:.1%} (loss {stats.val_loss:.4f})" if stats.val_accuracy is not None else ""
    )
    return (
        f"{_run_label(stats.phase, stats.k)} epoch {stats.epoch}/{stats.epochs}: loss {stats.train_loss:.4f}, "
        f"train acc {stats.train_accuracy:.1%}{validation}, {stats.images_per_second:.0f} img/s, "
        f"lr {stats.lr:.2e}, {stats.seconds:.1f} s"
    )


def _run_label(phase: str, k: int) -> str:
    return f"[k-search k={k}]" if phase == "k-search" else f"[k={k}]"


def _bar(done: int, total: int) -> str:
    filled = BAR_CELLS if total <= 0 else min(BAR_CELLS, BAR_CELLS * done // total)
    return "[" + "#" * filled + "-" * (BAR_CELLS - filled) + "]"
