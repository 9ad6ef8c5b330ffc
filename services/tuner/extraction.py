"""Fetching a dataset's gathered features from the extractor for a tune: every image once per k, kept compressed,
resumed and re-asked until each image has exactly one answer (or the extractor refused it).

    store, stats = extract_features(dataset, extractor, ks=(2,), codec="i8-zstd", backbone=None)  # refusals raise
    fetched = fetch_features(dataset, extractor, ks=(2,), codec="i8-zstd", backbone=None)  # refusals listed
    dataset, store = fetched.usable(dataset)  # without the refused images, when the tune skips them
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from services.common import errors
from services.common.clients.extractor import DEFAULT_MAX_IN_FLIGHT, ExtractorClient, ExtractResult, ImageItem
from services.common.errors import InvalidArgumentError
from services.common.pb import feature_pb2
from services.tuner.data import Dataset, SkippedImage, unusable_images_message
from services.tuner.feature_store import FeatureStore
from services.tuner.reports import ExtractionStats, TuneObserver


@dataclass(frozen=True)
class FetchedFeatures:
    """What one extraction got: the features of every image the extractor accepted, and the ones it refused."""

    store: FeatureStore  # indexed like the dataset fetched for; refused images have no feature
    stats: ExtractionStats
    refused: dict[int, SkippedImage]  # dataset position -> why the extractor refused the image

    def usable(self, dataset: Dataset) -> tuple[Dataset, FeatureStore]:
        """The dataset without the refused images (listed in its `skipped`) and a store indexed like it; the same
        two when nothing was refused, else a new store and this one is closed. TooFewUsableImagesError (this
        store closed) when a class is left without train images."""
        if not self.refused:
            return dataset, self.store
        with self.store:
            reduced = dataset.without(self.refused)
            return reduced, self.store.subset([i for i in range(len(dataset)) if i not in self.refused])


def extract_features(
    dataset: Dataset,
    extractor: ExtractorClient,
    *,
    ks: Sequence[int],
    codec: str,
    backbone: feature_pb2.BackboneId | None,
    observer: TuneObserver | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    attempts: int = 3,
) -> tuple[FeatureStore, ExtractionStats]:
    """Every image's features for every k in `ks`, fetched once and kept compressed.

    Within a pass the client resumes a broken stream by itself (re-sending only the unanswered images); when the
    extractor stays away longer, another pass asks again for the images still missing, up to `attempts` passes.
    A feature that fails its checksum is fetched again the same way. Images the extractor refuses (undecodable,
    too large) fail the whole extraction with one message naming them all: training on a silently smaller set
    would hide the problem (fetch_features lists them instead).
    """
    fetched = fetch_features(dataset, extractor, ks=ks, codec=codec, backbone=backbone, observer=observer,
                             max_in_flight=max_in_flight, attempts=attempts)  # fmt: skip
    if fetched.refused:
        fetched.store.close()
        raise InvalidArgumentError(refusal_message(fetched.refused.values()))
    return fetched.store, fetched.stats


def fetch_features(
    dataset: Dataset,
    extractor: ExtractorClient,
    *,
    ks: Sequence[int],
    codec: str,
    backbone: feature_pb2.BackboneId | None,
    observer: TuneObserver | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    attempts: int = 3,
) -> FetchedFeatures:
    """As extract_features, but every image the extractor refuses (undecodable_image, empty_image,
    unsupported_format, image_too_large) is listed in the result instead of failing the extraction."""
    observer = observer or TuneObserver()
    store = FeatureStore.for_dataset(dataset, backbone=backbone)
    total, started = len(dataset), time.perf_counter()
    refused: dict[int, feature_pb2.ItemError] = {}
    results = cache_hits = passes = corrupt = 0
    while missing := [i for i in store.missing(range(total), ks) if i not in refused]:
        if passes == attempts and corrupt:  # the extractor answered, but its features kept failing their checks
            raise errors.DataLossError(
                f"{corrupt} image(s) got corrupted features on every one of {attempts} "
                f"passes over {extractor.target}; nothing was pushed"
            )
        if passes == attempts:
            raise errors.UnavailableError(
                f"{len(missing)} image(s) still lack features after {attempts} passes "
                f"over {extractor.target}; is the extractor up?"
            )
        passes += 1
        corrupt = 0
        answered = total - len(missing)  # refused images count as answered: asking again would not help
        try:
            for index, result in zip(
                missing, _extract(dataset, missing, extractor, ks, codec, backbone, max_in_flight), strict=False
            ):
                results += 1
                cache_hits += result.cache_hit
                if result.error is not None:
                    refused[index] = result.error
                    answered += 1
                elif _keep(store, index, ks, result.features, observer):
                    answered += 1
                else:
                    corrupt += 1
                observer.on_extraction(answered, total, store.compressed_bytes())
        except errors.UnavailableError as error:
            observer.message(f"extractor unavailable ({error}); asking again for the missing images")
    stats = ExtractionStats(images=total - len(refused), ks=tuple(ks), codec=codec,
                            feature_bytes=store.compressed_bytes(),
                            bytes_per_image_by_k={k: store.bytes_per_image(k) for k in ks},
                            results=results, passes=passes, cache_hits=cache_hits,
                            seconds=time.perf_counter() - started)  # fmt: skip
    skipped = {
        i: SkippedImage(dataset.items[i].name, e.reason or "refused", e.message or e.reason) for i, e in refused.items()
    }
    return FetchedFeatures(store, stats, skipped)


def refusal_message(refused: Iterable[SkippedImage]) -> str:
    """One line naming every image the extractor refused (data.MAX_LISTED_UNUSABLE of them, then how many more)."""
    return unusable_images_message(
        list(refused),
        "the extractor could not use {n} image(s)",
        "fix or remove them and tune again (nothing was pushed)",
    )


def _extract(
    dataset: Dataset,
    indices: list[int],
    extractor: ExtractorClient,
    ks: Sequence[int],
    codec: str,
    backbone: feature_pb2.BackboneId | None,
    max_in_flight: int,
) -> Iterator[ExtractResult]:
    items = (ImageItem(dataset.items[i].name, dataset.items[i].read_bytes()) for i in indices)  # read lazily
    return extractor.extract(
        items, mode="mist", ks=ks, codec=codec, expect_backbone=backbone, max_in_flight=max_in_flight
    )


def _keep(
    store: FeatureStore,
    index: int,
    ks: Sequence[int],
    features: Sequence[feature_pb2.FeatureTensor],
    observer: TuneObserver,
) -> bool:
    """Store one image's features; False when one was corrupted on the way (the next pass fetches it again)."""
    if len(features) != len(ks):
        raise errors.DataLossError(f"the extractor sent {len(features)} features for {len(ks)} requested k")
    try:
        for k, feature in zip(ks, features, strict=True):
            store.add(index, k, feature)
    except errors.DataLossError as error:
        observer.message(f"image {index}: {error}; fetching it again")
        return False
    return True
