"""Prediction and evaluation with a stored version: pull the weights (by number, alias or latest; cached locally by
sha256), fetch each image's feature at the version's k and codec, classify on this machine, without torch.

    with endpoints.extractor_client() as extractor, endpoints.registry_client() as registry:
        loaded = load_version(registry, "shapes", alias="production")   # runtime="torch" runs the training code
        for prediction in predict_images(loaded, extractor, [ImageItem("a.png", data)]):
            print(prediction.to_dict())   # {"item": "a.png", "label": "circle", "probability": 0.93, "top": [...]}
        report = evaluate_path(loaded, extractor, "labelled/")   # accuracy, per class, confusion matrix

The version's k and codec come from its safetensors metadata (`mist.k`, `mist.codec`, written by tune), else its
metrics / tags, else the task's; the features are asked for with the task's backbone id, so an extractor serving
other weights is refused (FAILED_PRECONDITION) instead of answering with features the network never saw.

A Predictor can change its weights while other threads predict (what the device agent, services/tuner/agent.py,
does on a promote): switch_to(N) pulls version N, loads it strictly and runs a smoke prediction before the swap,
and every prediction uses the one version it read at its start (Prediction.version says which).

Runtimes: "numpy" (the default: services/tuner/edge_numpy.py, what a predict-only device installs) or "torch" (the
training code's network). Both read the same safetensors weights and agree to 1e-4 in probability; importing this
module loads no torch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import grpc
import numpy as np

from services.common.clients.extractor import DEFAULT_MAX_IN_FLIGHT, ExtractorClient, ImageItem
from services.common.clients.registry import PulledVersion, RegistryClient
from services.common.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    MistError,
    ResourceExhaustedError,
    UnavailableError,
)
from services.common.pb import feature_pb2
from services.common.wire.codec import CodecConfig, decode_feature
from services.common.wire.edge_spec import EdgeNetworkConfig
from services.registry.records import Task, Version
from services.tuner.config import Endpoints
from services.tuner.data import IMAGE_EXTENSIONS, SPLITS, Dataset, load_dataset
from services.tuner.edge_numpy import NumpyEdgeNetwork
from services.tuner.evaluation import EvaluationReport, Predictions, report_from_predictions
from services.tuner.options import METADATA_CODEC, METADATA_K, Runtime

DEFAULT_TOP_K = 5
EvaluateSplit = Literal["auto", "all", "train", "val", "test"]
_STATUS_NAMES = {status.value[0]: status.name for status in grpc.StatusCode}  # ItemError.code -> "INVALID_ARGUMENT"
RUNTIMES: tuple[Runtime, ...] = ("numpy", "torch")
_MAX_NAMED_FAILURES = 20  # images named in one error message; the count is always exact


class Classifier(Protocol):
    """A loaded edge network, whatever runs it: logits [B, C] of features [B, T, D] (or [T, D])."""

    def logits(self, features: np.ndarray) -> np.ndarray: ...


class _TorchClassifier:
    """The torch runtime: the network the tuner trains, in eval mode (`--runtime torch`)."""

    def __init__(self, model: object) -> None:
        self._model = model

    def logits(self, features: np.ndarray) -> np.ndarray:
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(features))
        with torch.inference_mode():
            return self._model(tensor[None] if tensor.ndim == 2 else tensor).numpy()  # type: ignore[operator]


def load_network(blob: bytes, expected: EdgeNetworkConfig, runtime: Runtime = "numpy") -> tuple[Classifier, dict]:
    """The network of a weights blob for `runtime`, strictly checked, and the blob's metadata."""
    if runtime == "numpy":
        return NumpyEdgeNetwork.from_safetensors_bytes(blob, expected)
    if runtime == "torch":
        from services.tuner.edge_network import from_safetensors_bytes

        model, metadata = from_safetensors_bytes(blob, expected)
        return _TorchClassifier(model.eval()), metadata
    raise InvalidArgumentError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, computed in float64 so that tiny probabilities stay exact enough to compare."""
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class LoadedVersion:
    """A version's network, ready to classify, and what its features must look like."""

    task: Task  # class names, backbone, edge network
    version: Version  # number, sha256, metrics, lineage
    model: Classifier  # the network, run by `runtime`
    k: int  # the gather depth the weights were trained on
    codec: str  # canonical codec name the features were trained with
    from_cache: bool  # the weights came from the local cache (only a header travelled)
    runtime: Runtime = "numpy"  # what runs the network

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.task.class_names


@dataclass(frozen=True)
class Prediction:
    """The answer for one image: a label with its probability and the top classes, or an error."""

    item_id: str  # as given (the CLI uses the file path)
    version: int  # the version that answered
    label: str = ""  # the most probable class; "" with an error
    probability: float = 0.0  # its probability
    top: tuple[tuple[str, float], ...] = ()  # (label, probability), most probable first
    error_code: str = ""  # a status code name ("INVALID_ARGUMENT") when the image could not be classified
    error_reason: str = ""  # machine-readable ("undecodable_image", "image_too_large", ...)
    error_message: str = ""  # what a person can act on
    feature_bytes: int = 0  # wire bytes of the image's feature (serialized FeatureTensor)

    @property
    def ok(self) -> bool:
        return not self.error_code

    def to_dict(self, id_key: str = "item") -> dict[str, object]:
        """One JSON line of `mist predict` (which names the item "file")."""
        if not self.ok:
            return {
                id_key: self.item_id,
                "version": self.version,
                "error": {"code": self.error_code, "reason": self.error_reason, "message": self.error_message},
            }
        return {id_key: self.item_id, "version": self.version, "label": self.label, "probability": self.probability,
                "top": [{"label": label, "probability": p} for label, p in self.top]}  # fmt: skip


def load_version(
    registry: RegistryClient,
    task: str,
    *,
    version: int | None = None,
    alias: str | None = None,
    runtime: Runtime = "numpy",
) -> LoadedVersion:
    """Pull (or take from the cache) a version by number, alias or, with neither, the latest; load it strictly."""
    if runtime not in RUNTIMES:
        raise InvalidArgumentError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    return loaded_from(registry.pull(task, version=version, alias=alias), runtime)


def loaded_from(pulled: PulledVersion, runtime: Runtime = "numpy") -> LoadedVersion:
    """A pulled (or locally kept) version's network, loaded strictly against its task's edge network."""
    model, metadata = load_network(pulled.blob, pulled.task.edge_config(), runtime)
    return LoadedVersion(task=pulled.task, version=pulled.version, model=model, k=_version_k(pulled, metadata),
                         codec=_version_codec(pulled, metadata), from_cache=pulled.from_cache,
                         runtime=runtime)  # fmt: skip


# ---------------------------------------------------------------------------------------------- validation

# Failures that say nothing about the version itself (the registry or the link is away, or busy): the caller tries
# again later; every other failure of a pull, a load or a smoke prediction refuses the version.
TRANSIENT_ERRORS: tuple[type[MistError], ...] = (UnavailableError, DeadlineExceededError, ResourceExhaustedError)
_TRANSIENT_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED"})
SMOKE_SEED = 0  # the smoke features: one [T, D] array of zeros and one of N(0, 1) values from this seed


def is_transient(error: BaseException) -> bool:
    """Whether an error of a registry call is worth retrying as it is (a refusal of the version is not)."""
    return isinstance(error, TRANSIENT_ERRORS) or (isinstance(error, MistError) and error.code in _TRANSIENT_CODES)


class VersionRejected(FailedPreconditionError):
    """A version this device will not run: its pull, strict load or smoke prediction failed. `step` says which
    ("pull", "load" or "smoke") and `reason` is one line for logs and the fleet view."""

    def __init__(self, task: str, version: int, step: str, reason: str) -> None:
        self.task, self.version, self.step = task, version, step
        self.reason = " ".join(f"{step}: {reason}".split())[:1000]  # the registry keeps 1,000 characters
        super().__init__(f"version {version} of task {task!r} refused: {self.reason}")


def smoke_features(config: EdgeNetworkConfig) -> np.ndarray:
    """[2, T, D] float32 features for a smoke prediction: zeros (the network's biases alone) and a fixed random
    array (every weight involved). Deterministic, so a version passes or fails the same way on every device."""
    random = np.random.default_rng(SMOKE_SEED).standard_normal((config.tokens, config.dims)).astype(np.float32)
    return np.stack([np.zeros_like(random), random])


def smoke_check(loaded: LoadedVersion) -> None:
    """Runs the network on smoke_features: InvalidArgumentError unless it answers [2, C] finite logits.

    Weights the registry accepts (finite float32 of the right shapes) can still overflow: a head scaled by 1e37
    gives inf logits and NaN probabilities on every image, which only running the network shows."""
    config = loaded.task.edge_config()
    with np.errstate(all="ignore"):  # overflow is what is being looked for: no RuntimeWarning on the way
        logits = np.asarray(loaded.model.logits(smoke_features(config)))
        scores = probabilities(logits) if logits.ndim >= 2 and logits.size else logits
    expected = (2, config.tokens, len(loaded.class_names)) if config.dense else (2, len(loaded.class_names))
    if logits.shape != expected:
        raise InvalidArgumentError(f"the network answered logits of shape {list(logits.shape)}, not {list(expected)}")
    if not (np.isfinite(logits).all() and np.isfinite(scores).all()):
        bad = int((~np.isfinite(logits)).sum())
        raise InvalidArgumentError(
            f"the smoke prediction gave non-finite logits ({bad} of {logits.size} values NaN or Inf)"
        )


def validate_version(registry: RegistryClient, task: str, version: int, runtime: Runtime = "numpy") -> LoadedVersion:
    """Version `version` of `task`, ready to swap in: pulled (sha256 checked by the client), loaded strictly against
    the task's edge network, and smoke-tested. VersionRejected when any step refuses it; a transient error (the
    registry away: is_transient) is raised as it is, since it says nothing about the version."""
    try:
        pulled = registry.pull(task, version=version)
    except MistError as error:
        if is_transient(error):
            raise
        raise VersionRejected(task, version, "pull", f"{error.code}: {error}") from error
    try:
        with np.errstate(over="ignore"):  # huge finite weights may overflow when folded: the smoke test says so
            loaded = loaded_from(pulled, runtime)
    except Exception as error:  # any refusal of the loader, whatever raised it: the old weights stay
        raise VersionRejected(task, version, "load", str(error)) from error
    try:
        smoke_check(loaded)
    except Exception as error:
        raise VersionRejected(task, version, "smoke", str(error)) from error
    return loaded


def _version_k(pulled: PulledVersion, metadata: dict[str, str]) -> int:
    number = pulled.version.number
    text = metadata.get(METADATA_K) or pulled.version.tags.get("k")
    if text:
        try:
            return int(text)
        except ValueError:
            raise InvalidArgumentError(f"version {number} carries a bad k {text!r}") from None
    k = int(pulled.version.metrics.get("k", 0)) or pulled.task.k
    if k < 1:
        raise FailedPreconditionError(f"version {number} says nothing about its k and the task has none")
    return k


def _version_codec(pulled: PulledVersion, metadata: dict[str, str]) -> str:
    text = metadata.get(METADATA_CODEC) or pulled.version.tags.get("codec")
    return CodecConfig.parse(text).name if text else CodecConfig.parse(pulled.task.codec).name


def predict_images(
    loaded: LoadedVersion,
    extractor: ExtractorClient,
    items: Iterable[ImageItem | tuple[str, bytes]],
    *,
    top_k: int = DEFAULT_TOP_K,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
) -> Iterator[Prediction]:
    """One Prediction per item, in order; an image the extractor refuses gets an error and the rest go on.

    Items are read lazily and classified one at a time as their features arrive, so memory stays flat.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InvalidArgumentError(f"top_k must be a positive integer, got {top_k!r}")
    _check_classification(loaded)
    names = loaded.class_names
    results = extractor.extract(
        items,
        mode="mist",
        ks=(loaded.k,),
        codec=loaded.codec,
        expect_backbone=loaded.task.backbone,
        max_in_flight=max_in_flight,
    )
    for result in results:
        if result.error is not None:
            yield _failed(result.item_id, loaded.version.number, result.error)
            continue
        scores = probabilities(loaded.model.logits(decode_feature(result.features[0])))[0]
        best = np.argsort(-scores, kind="stable")[: min(top_k, len(names))]
        top = tuple((names[i], float(scores[i])) for i in best)
        yield Prediction(
            result.item_id,
            loaded.version.number,
            label=top[0][0],
            probability=top[0][1],
            top=top,
            feature_bytes=result.features[0].ByteSize(),
        )


def _check_classification(loaded: LoadedVersion) -> None:
    """FailedPreconditionError unless the version classifies (a segmentation version answers with label maps)."""
    if loaded.task.kind != "classification":
        raise FailedPreconditionError(
            f"task {loaded.task.name!r} is a {loaded.task.kind} task: its answers are label maps "
            "(mist predict --output-dir, or services.tuner.segmentation.segment_items); the Predictor, the device "
            "agent and the worker's Predict classify"
        )


class Predictor:
    """A long-running predictor: one extractor channel, one registry client and the loaded weights, kept across
    images, so a camera-class device pays start-up once and each image costs one round trip.

        with Predictor(endpoints, "shapes", alias="production") as predictor:
            prediction = predictor.predict_file("frame-0001.jpg")   # or predict(image_bytes, item_id)
            predictor.switch_to(7)   # from another thread too: validated, then swapped; VersionRejected keeps 6

    A file that cannot be read, or an image the extractor refuses, gets a Prediction with an error; the predictor
    goes on with the next. reload() pulls the reference again (cheap when the weights did not change).

    Swaps are safe while other threads predict: `loaded` is one reference replaced whole (under a lock, so two
    swaps never interleave), and each prediction reads it once at its start and uses only that: the k, codec,
    network and class names of one version, never a mix; its Prediction.version names that version. `loaded`
    (start with these weights instead of pulling, e.g. the ones a device ran before a restart) leaves the
    registry untouched until reload() or switch_to().
    """

    def __init__(
        self,
        endpoints: Endpoints,
        task: str,
        *,
        version: int | None = None,
        alias: str | None = None,
        runtime: Runtime = "numpy",
        top_k: int = DEFAULT_TOP_K,
        loaded: LoadedVersion | None = None,
    ) -> None:
        self._reference = dict(version=version, alias=alias, runtime=runtime)
        self._task, self._top_k, self._runtime = task, top_k, runtime
        self._swap_lock = threading.Lock()
        self._extractor = endpoints.extractor_client()
        try:
            self._registry = endpoints.registry_client()
            try:
                if loaded is None:
                    loaded = load_version(self._registry, task, **self._reference)  # type: ignore[arg-type]
                _check_classification(loaded)
                self._loaded = loaded
            except BaseException:
                self._registry.close()
                raise
        except BaseException:
            self._extractor.close()
            raise

    @property
    def loaded(self) -> LoadedVersion:
        """The version predictions use now (one reference: read it once and use that)."""
        return self._loaded

    @loaded.setter
    def loaded(self, loaded: LoadedVersion) -> None:
        self.swap(loaded)

    @property
    def task(self) -> str:
        return self._task

    def swap(self, loaded: LoadedVersion) -> LoadedVersion:
        """Replace the weights in use with `loaded` (already checked: see switch_to); returns the previous ones.
        Predictions already running finish on the previous version; those that start after use `loaded`."""
        if loaded.task.name != self._task:
            raise InvalidArgumentError(f"version of task {loaded.task.name!r} offered to a predictor of {self._task!r}")
        with self._swap_lock:
            previous, self._loaded = self._loaded, loaded
        return previous

    def validate(self, version: int) -> LoadedVersion:
        """Version `version` pulled, loaded strictly and smoke-tested (validate_version), without swapping it in."""
        return validate_version(self._registry, self._task, version, self._runtime)

    def switch_to(self, version: int) -> LoadedVersion:
        """Validate version `version`, then swap it in; returns it. On VersionRejected (or a transient registry
        error) the weights in use stay as they were."""
        if version == self._loaded.version.number:
            return self._loaded
        candidate = self.validate(version)
        self.swap(candidate)
        return candidate

    def reload(self) -> LoadedVersion:
        """Pull the version reference again (an alias may have moved); only a header travels when it did not."""
        loaded = load_version(self._registry, self._task, **self._reference)  # type: ignore[arg-type]
        self.swap(loaded)
        return loaded

    def predict(self, image: bytes, item_id: str = "") -> Prediction:
        """One image's prediction (an undecodable or oversized image gets an error, not an exception)."""
        loaded = self._loaded  # one version for the whole prediction, whatever a swap does meanwhile
        items = [ImageItem(item_id, image)]
        return next(predict_images(loaded, self._extractor, items, top_k=self._top_k, max_in_flight=1))

    def predict_file(self, path: str | Path) -> Prediction:
        """The prediction of an image file; an unreadable file gets an INVALID_ARGUMENT error line."""
        try:
            image = Path(path).expanduser().read_bytes()
        except OSError as error:
            message = f"cannot read image {path}: {error.strerror or error}"
            return Prediction(str(path), self._loaded.version.number, error_code="INVALID_ARGUMENT",
                              error_reason="unreadable_file", error_message=message)  # fmt: skip
        return self.predict(image, str(path))

    def close(self) -> None:
        self._extractor.close()
        self._registry.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _failed(item_id: str, version: int, error: feature_pb2.ItemError) -> Prediction:
    code = _STATUS_NAMES.get(error.code, "UNKNOWN")
    return Prediction(item_id, version, error_code=code, error_reason=error.reason, error_message=error.message)


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The image files named, with folders expanded to the images under them (sorted); a missing path is an error."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise InvalidArgumentError(f"folder {path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InvalidArgumentError(f"no such image or folder: {raw}")
    return files


def file_items(files: Iterable[Path]) -> Iterator[ImageItem]:
    """ImageItems named by path, read one at a time as the extractor asks for them."""
    for path in files:
        try:
            yield ImageItem(str(path), path.read_bytes())
        except OSError as error:
            raise InvalidArgumentError(f"cannot read image {path}: {error.strerror or error}") from None


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class VersionEvaluation:
    """`mist evaluate`: how a stored version does on a labelled folder."""

    task: str
    version: int
    k: int
    split: str  # the split scored: "all", "train", "val" or "test"
    report: EvaluationReport

    def to_dict(self) -> dict[str, object]:
        return {"task": self.task, "version": self.version, "k": self.k, "split": self.split,
                "chance_accuracy": 1 / len(self.report.class_names), **self.report.to_dict()}  # fmt: skip

    def summary(self) -> str:
        report = self.report
        lines = [
            f"task {self.task} version {self.version} (k={self.k}) on {report.count} images ({self.split}): "
            f"accuracy {report.accuracy:.3f}, balanced {report.balanced_accuracy:.3f}, "
            f"chance {1 / len(report.class_names):.3f}"
        ]
        width = max(len(name) for name in report.class_names)
        lines.append(f"  {'class':<{width}} {'acc':>6}  confusion row (predicted, in the order of the rows)")
        for name, accuracy, row in zip(
            report.class_names, report.per_class_accuracy, report.confusion_matrix, strict=True
        ):
            shown = "   -  " if accuracy is None else f"{accuracy:6.3f}"
            lines.append(f"  {name:<{width}} {shown}  {' '.join(f'{n:3d}' for n in row)}")
        return "\n".join(lines)


def evaluate_path(
    loaded: LoadedVersion,
    extractor: ExtractorClient,
    path: str | Path,
    *,
    split: EvaluateSplit = "auto",
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
) -> VersionEvaluation:
    """Score the version on a labelled folder or manifest (class folders must be among the task's classes).

    split "auto" scores the test split when the data has one (test/ folders or a split column), else every image.
    """
    if split not in ("auto", "all", *SPLITS):
        raise InvalidArgumentError(f"split must be auto, all, train, val or test, got {split!r}")
    dataset = _remapped(load_dataset(path, val_fraction=0.0, test_fraction=0.0), loaded.class_names)
    chosen = ("test" if dataset.indices("test") else "all") if split == "auto" else split
    indices = list(range(len(dataset))) if chosen == "all" else dataset.indices(chosen)  # type: ignore[arg-type]
    if not indices:
        raise InvalidArgumentError(f"{path} has no {chosen} images")
    items = [dataset.items[i] for i in indices]
    results = extractor.extract(
        (ImageItem(item.name, item.read_bytes()) for item in items),  # read lazily, one at a time
        mode="mist",
        ks=(loaded.k,),
        codec=loaded.codec,
        expect_backbone=loaded.task.backbone,
        max_in_flight=max_in_flight,
    )
    labels = np.array([item.label for item in items], dtype=np.int64)
    predicted = np.zeros(len(items), dtype=np.int64)
    loss_sum, failed = 0.0, []
    for position, result in enumerate(results):  # one result per image, in order
        if result.error is not None:
            failed.append(f"{items[position].name} ({result.error.reason})")
            continue
        logits = loaded.model.logits(decode_feature(result.features[0]))[0].astype(np.float64)
        predicted[position] = int(np.argmax(logits))
        top = logits.max()
        loss_sum += float(top + np.log(np.exp(logits - top).sum()) - logits[labels[position]])  # cross-entropy
    if failed:
        named = ", ".join(failed[:_MAX_NAMED_FAILURES]) + (
            f" and {len(failed) - _MAX_NAMED_FAILURES} more" if len(failed) > _MAX_NAMED_FAILURES else ""
        )
        raise InvalidArgumentError(f"{len(failed)} image(s) of {path} could not be scored: {named}")
    report = report_from_predictions(Predictions(labels, predicted, loss_sum), loaded.class_names)
    return VersionEvaluation(loaded.task.name, loaded.version.number, loaded.k, chosen, report)


def _remapped(dataset: Dataset, task_classes: tuple[str, ...]) -> Dataset:
    """The dataset with labels as the task's indices: a folder may hold a subset of the classes, never others."""
    unknown = sorted(set(dataset.class_names) - set(task_classes))
    if unknown:
        raise InvalidArgumentError(
            f"classes {unknown} of {dataset.root} are not among the task's classes {list(task_classes)}"
        )
    index = {name: i for i, name in enumerate(task_classes)}
    items = tuple(
        type(item)(item.name, index[dataset.class_names[item.label]], item.split, item.path, item.data)
        for item in dataset.items
    )
    return Dataset(dataset.root, task_classes, items, dataset.layout, dataset.warnings)
