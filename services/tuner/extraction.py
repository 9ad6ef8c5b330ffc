"""Fetching a dataset's gathered features from the extractor for a tune: every image once per k, kept compressed,
resumed and re-asked until each image has exactly one answer (or the extractor refused it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from services.common import errors
from services.common.clients.extractor import DEFAULT_MAX_IN_FLIGHT, ExtractorClient, ExtractResult, ImageItem
from services.common.errors import InvalidArgumentError
from services.common.pb import feature_pb2
from services.tuner.data import Dataset
from services.tuner.feature_store import FeatureStore
from services.tuner.reports import ExtractionStats, TuneObserver

_MAX_LISTED_FAILURES = 5  # per-image problems quoted in one error message


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
    too large) fail the whole extraction with one message naming them: training on a silently smaller set would
    hide the problem.
    """
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
    if refused:
        raise InvalidArgumentError(_refusal_message(dataset, refused))
    stats = ExtractionStats(images=total, ks=tuple(ks), codec=codec, feature_bytes=store.compressed_bytes(),
                            bytes_per_image_by_k={k: store.bytes_per_image(k) for k in ks},
                            results=results, passes=passes, cache_hits=cache_hits,
                            seconds=time.perf_counter() - started)  # fmt: skip
    return store, stats


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


def _refusal_message(dataset: Dataset, refused: dict[int, feature_pb2.ItemError]) -> str:
    shown = [
        f"{dataset.items[i].name}: {e.message or e.reason}" for i, e in list(refused.items())[:_MAX_LISTED_FAILURES]
    ]
    more = f" (and {len(refused) - len(shown)} more)" if len(refused) > len(shown) else ""
    return (
        f"the extractor could not use {len(refused)} image(s){more}: {'; '.join(shown)}; "
        "fix or remove them and tune again (nothing was pushed)"
    )
