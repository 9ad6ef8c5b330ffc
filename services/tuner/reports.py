"""What a tune reports: progress hooks while it runs (TuneObserver; ReporterObserver draws them with a
ProgressReporter) and what it produced (TuneResult, with how the features arrived and what they cost on the wire
next to the baselines).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from services.common.clients.extractor import BackboneInfo
from services.registry.records import Version
from services.tuner.data import MAX_LISTED_UNUSABLE, SkippedImage
from services.tuner.evaluation import EvaluationReport
from services.tuner.progress import ProgressReporter
from services.tuner.training import EpochStats, KSelection, StepProgress

logger = logging.getLogger("mist.tuner")


class TuneObserver:
    """What the pipeline reports as it goes; every hook is a no-op here. An exception raised by a hook aborts
    the tune before anything is pushed (the worker cancels jobs this way)."""

    def on_backbone(self, info: BackboneInfo) -> None:
        """The extractor's Describe answer, before any image is sent."""

    def on_extraction(self, done: int, total: int, feature_bytes: int) -> None:
        """`done` of `total` images have every feature; `feature_bytes` wire bytes held so far."""

    def on_step(self, progress: StepProgress) -> None:
        """After each optimizer step."""

    def on_epoch(self, stats: EpochStats) -> None:
        """After each epoch (k-search runs and the final run)."""

    def on_k_selection(self, selection: KSelection) -> None:
        """`--k auto` chose."""

    def message(self, text: str) -> None:
        """A line for people: what happens next, warnings."""

    def warning(self, text: str) -> None:
        """A problem that does not stop the tune (skipped images, a class absent from val): a message here."""
        self.message(f"warning: {text}")

    def before_push(self) -> None:
        """The last moment to abort: after this the version exists."""


class ReporterObserver(TuneObserver):
    """Shows the pipeline's progress with a ProgressReporter (a bar on a terminal, log lines elsewhere)."""

    def __init__(self, reporter: ProgressReporter) -> None:
        self.reporter = reporter

    def on_extraction(self, done: int, total: int, feature_bytes: int) -> None:
        self.reporter.on_extraction(done, total, feature_bytes)

    def on_step(self, progress: StepProgress) -> None:
        self.reporter.on_step(progress)

    def on_epoch(self, stats: EpochStats) -> None:
        self.reporter.on_epoch(stats)

    def on_k_selection(self, selection: KSelection) -> None:
        self.reporter.on_k_selection(selection)

    def message(self, text: str) -> None:
        self.reporter.message(text)

    def warning(self, text: str) -> None:
        if self.reporter.mode == "quiet":  # quiet drops progress, not warnings
            logger.warning("%s", text)
        else:
            self.reporter.message(f"warning: {text}")


@dataclass(frozen=True)
class ExtractionStats:
    """How the features arrived."""

    images: int  # images with every requested feature
    ks: tuple[int, ...]  # the k fetched for every image (all candidates for --k auto)
    codec: str  # canonical codec name
    feature_bytes: int  # wire bytes of every feature held (serialized FeatureTensor messages)
    bytes_per_image_by_k: dict[int, float]  # mean wire bytes of one image's k feature
    results: int  # results accepted: exactly one per image, however often the stream was resumed
    passes: int  # extraction passes over the missing images (1 unless the extractor stayed away)
    cache_hits: int  # images the extractor answered from its cache
    seconds: float  # wall time of the extraction

    def to_dict(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        data["bytes_per_image_by_k"] = {str(k): v for k, v in self.bytes_per_image_by_k.items()}
        return data


@dataclass(frozen=True)
class TransferSummary:
    """Bytes per image this task costs on the wire next to what the baselines send on the same backbone."""

    k: int  # the version's k
    codec: str  # the codec the features travelled in
    bytes_per_image: float  # measured: mean serialized feature of the chosen k
    fetched_bytes_per_image: float  # measured: everything fetched per image (every candidate k for --k auto)
    baselines: dict[str, int]  # float32 bytes per image from Describe: lst, last, partial, cls, mist_f32

    def times_smaller(self, method: str) -> float | None:
        """How many times fewer bytes than `method` sends; None when Describe did not report it."""
        other = self.baselines.get(method)
        return other / self.bytes_per_image if other and self.bytes_per_image else None

    def to_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self),
                "times_smaller": {m: self.times_smaller(m) for m in self.baselines}}  # fmt: skip


@dataclass(frozen=True)
class AliasMove:
    name: str  # e.g. "production"
    from_version: int  # 0: the alias did not exist
    to_version: int


@dataclass(frozen=True)
class TuneResult:
    """What a tune produced; `version` is what the registry stored."""

    version: Version  # number, sha256, metrics, lineage
    task_created: bool  # this tune created the task
    k: int  # the k the weights were trained on
    k_selection: KSelection | None  # the candidates' scores with --k auto
    kept_epoch: int  # the final run's epoch whose weights were pushed (best on val)
    val: EvaluationReport | None  # None without a val split
    test: EvaluationReport | None  # None without a test split
    num_classes: int
    transfer: TransferSummary
    extraction: ExtractionStats
    alias: AliasMove | None  # the alias moved, if asked
    pretrained: bool  # False: the extractor runs a random backbone (accuracy only "above chance")
    warnings: tuple[str, ...]
    seconds: float  # wall time of the whole tune
    skipped: tuple[SkippedImage, ...] = ()  # unusable images left out (skip_unreadable)

    def to_dict(self) -> dict[str, object]:
        version = self.version
        return {
            "task": version.task, "version": version.number, "sha256": version.sha256,
            "parent_version": version.parent_version, "dataset_fingerprint": version.dataset_fingerprint,
            "tuner": version.tuner, "task_created": self.task_created, "k": self.k,
            "k_selection": self.k_selection.to_dict() if self.k_selection else None, "kept_epoch": self.kept_epoch,
            "val": self.val.to_dict() if self.val else None, "test": self.test.to_dict() if self.test else None,
            "chance_accuracy": 1 / self.num_classes, "transfer": self.transfer.to_dict(),
            "extraction": self.extraction.to_dict(), "alias": dataclasses.asdict(self.alias) if self.alias else None,
            "pretrained_backbone": self.pretrained, "metrics": dict(sorted(self.version.metrics.items())),
            "warnings": list(self.warnings), "skipped": [image.to_dict() for image in self.skipped],
            "seconds": self.seconds,
        }  # fmt: skip

    def summary(self) -> str:
        """The lines `mist tune` prints on stdout."""
        how = "chosen on validation" if self.k_selection else "as asked"
        lines = [
            f"task {self.version.task}: version {self.version.number} (parent {self.version.parent_version or '-'}"
            f"{', task created' if self.task_created else ''}), k={self.k} {how}"
        ]
        scores = [
            f"{name} accuracy {report.accuracy:.3f} ({report.count} images)"
            for name, report in (("val", self.val), ("test", self.test))
            if report is not None
        ]
        lines.append(
            "  "
            + ", ".join(scores or ["no val or test split: nothing scored"])
            + f"; chance {1 / self.num_classes:.3f}"
        )
        lines.append("  " + transfer_line(self.transfer))
        if self.alias:
            lines.append(f"  alias {self.alias.name}: {self.alias.from_version or '-'} -> {self.alias.to_version}")
        if not self.pretrained:
            lines.append("  note: the extractor runs a RANDOMLY INITIALISED backbone; accuracy is only 'above chance'")
        lines.extend(skipped_lines(self.skipped))
        return "\n".join(lines)


def skipped_lines(skipped: tuple[SkippedImage, ...]) -> list[str]:
    """'  skipped 2 unusable image(s):' then one indented line each (at most MAX_LISTED_UNUSABLE, then a count)."""
    if not skipped:
        return []
    lines = [f"  skipped {len(skipped)} unusable image(s):"]
    lines += [f"    {image}" for image in skipped[:MAX_LISTED_UNUSABLE]]
    if len(skipped) > MAX_LISTED_UNUSABLE:
        lines.append(
            f"    and {len(skipped) - MAX_LISTED_UNUSABLE} more (all of them in --json and the version's details)"
        )
    return lines


def transfer_line(transfer: TransferSummary) -> str:
    """'received 3,412 B/image (i8-zstd, k=6) vs LST 10,880 (3.2x more), LAST 6,528 (1.9x more)'."""
    parts = [
        f"{name} {transfer.baselines[method]:,} ({transfer.times_smaller(method):.1f}x more)"
        for method, name in (("lst", "LST"), ("last", "LAST"))
        if transfer.baselines.get(method)
    ]
    versus = f" vs {', '.join(parts)}" if parts else ""
    return f"received {transfer.bytes_per_image:,.0f} B/image ({transfer.codec}, k={transfer.k}){versus}"
