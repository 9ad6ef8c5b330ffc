"""The serving path's stages one by one, in this process, on the inputs the servers get: what one image costs in CPU
when each step runs alone (one torch thread, time.thread_time), to set against the server's measured CPU per image.

    stages = measure_stages(jpegs, info, answers, reps=3)  # info: the server's BackboneInfo, answers its FeatureTensors
    stages["stages_ms"]["decode"], stages["apis"]["decode"], stages["missing"]

Where an API the rewritten serving path uses does not exist (yet) in this tree, the stage falls back to the older
one and says so in `apis` and `missing`; a stage that the fallback folds into another one is reported as None.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from services.common.pb import extractor_pb2, feature_pb2
from services.common.wire.codec import DEFAULT_CODEC, FeatureCodec, decode_feature
from services.extractor.cache import FeatureCache, cache_key, image_sha256
from services.extractor.config import ExtractorConfig
from services.extractor.preprocess import ImagePreprocessor

BATCH = 32  # the server's default --max-batch-size: normalize and quantize run per batch
_CACHE_ENTRIES = 256  # entries in the looked-up cache, so a lookup is a dict probe among many, not one

STAGE_NAMES = ("cache_lookup", "decode", "normalize", "quantize", "encode", "answer")


def measure_stages(
    images: Sequence[bytes],
    info: extractor_pb2.BackboneInfo,
    answers: Sequence[feature_pb2.FeatureTensor],
    *,
    reps: int,
) -> dict[str, Any]:
    """ms of CPU per image for each stage (median over `reps` passes over `images`), and which API each one used."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server's decode / encode threads run
    try:
        return _Stages(images, info, answers, reps).measure()
    finally:
        torch.set_num_threads(previous_threads)


def preprocessor_for(info: extractor_pb2.BackboneInfo) -> ImagePreprocessor:
    """The server's preprocessor, from the data config Describe reports."""
    config = info.data_config
    return ImagePreprocessor(
        {
            "input_size": tuple(config.input_size),
            "interpolation": config.interpolation,
            "mean": tuple(config.mean),
            "std": tuple(config.std),
            "crop_pct": config.crop_pct,
            "crop_mode": config.crop_mode,
        },
        resize=ExtractorConfig.resize,  # the server runs with its defaults
    )


class _Stages:
    def __init__(
        self,
        images: Sequence[bytes],
        info: extractor_pb2.BackboneInfo,
        answers: Sequence[feature_pb2.FeatureTensor],
        reps: int,
    ) -> None:
        self.images, self.info, self.reps = list(images), info, reps
        self.preprocessor = preprocessor_for(info)
        self.codec = FeatureCodec(DEFAULT_CODEC)
        self.k = int(answers[0].k)
        # The server's own answers decoded: re-quantizing them gives the very same int8 values and scales, so the
        # encode stage compresses what the server compresses.
        rows = [torch.from_numpy(decode_feature(answer)) for answer in answers]
        self.features = torch.stack([rows[i % len(rows)] for i in range(BATCH)])  # float32 [BATCH, T, D]
        self.answer = answers[0]
        self.apis: dict[str, str] = {}
        self.missing: list[str] = []

    def measure(self) -> dict[str, Any]:
        stages: dict[str, float | None] = {"cache_lookup": self._per_image(self._lookup_all(), len(self.images))}
        stages |= self._preprocessing()
        stages |= self._quantize_and_encode()
        stages["answer"] = self._per_image(self._answer_all, BATCH)
        self.apis["answer"] = "ExtractResponse(item_id, features).SerializeToString"
        legacy = {
            "decode_float32": self._per_image(
                lambda: [self.preprocessor.decode(i) for i in self.images], len(self.images)
            ),
            "encode_float32": self._per_image(self._encode_floats, BATCH),
        }
        return {
            "stages_ms": stages,
            "apis": self.apis,
            "missing": self.missing,
            "legacy_ms": legacy,
            "images": len(self.images),
            "batch": BATCH,
            "reps": self.reps,
        }

    def _per_image(self, work: Callable[[], object], count: int) -> float:
        """Median over reps of one pass's thread CPU, in ms per item (one warm-up pass first)."""
        work()
        samples = []
        for _ in range(self.reps):
            started = time.thread_time()
            work()
            samples.append((time.thread_time() - started) * 1000.0 / count)
        return statistics.median(samples)

    # ---- (a) cache lookup: hash the bytes, probe the cache (a miss, as every image of a miss pass) ------------

    def _lookup_all(self) -> Callable[[], object]:
        cache = FeatureCache(1 << 30)
        backbone_id = f"{self.info.backbone.name}@{self.info.backbone.weights_fingerprint}"
        value = self.answer.SerializeToString()
        for number in range(_CACHE_ENTRIES):
            cache.put(cache_key(backbone_id, f"{number:064x}", "mist", self.k, DEFAULT_CODEC.name), value)
        self.apis["cache_lookup"] = "image_sha256 + FeatureCache.get"

        def lookup() -> None:
            for image in self.images:
                cache.get(cache_key(backbone_id, image_sha256(image), "mist", self.k, DEFAULT_CODEC.name))

        return lookup

    # ---- (b) decode to uint8, (c) normalise per batch -----------------------------------------------------------

    def _preprocessing(self) -> dict[str, float | None]:
        preprocessor, images = self.preprocessor, self.images
        if not (hasattr(preprocessor, "load_uint8") and hasattr(preprocessor, "normalize")):
            self.missing.append("ImagePreprocessor.load_uint8 / normalize")
            self.apis |= {"decode": "ImagePreprocessor.decode (float32, normalisation included)", "normalize": "n/a"}
            return {
                "decode": self._per_image(lambda: [preprocessor.decode(i) for i in images], len(images)),
                "normalize": None,
            }
        self.apis |= {
            "decode": "ImagePreprocessor.load_uint8",
            "normalize": f"ImagePreprocessor.normalize, per {BATCH}",
        }
        decoded = [preprocessor.load_uint8(image) for image in images]
        batch = torch.stack([decoded[i % len(decoded)] for i in range(BATCH)])
        return {
            "decode": self._per_image(lambda: [preprocessor.load_uint8(i) for i in images], len(images)),
            "normalize": self._per_image(lambda: preprocessor.normalize(batch), BATCH),
        }

    # ---- (d) quantize per batch, (e) encode per image -----------------------------------------------------------

    def _quantize_and_encode(self) -> dict[str, float | None]:
        quantize_rows_i8 = _optional_quantizer()
        if not hasattr(self.codec, "encode_quantized"):
            # The old path: FeatureCodec.encode quantizes (numpy) and compresses in one call.
            self.missing.append("FeatureCodec.encode_quantized")
            self.apis |= {"quantize": "inside FeatureCodec.encode", "encode": "FeatureCodec.encode (numpy quantize)"}
            return {"quantize": None, "encode": self._per_image(self._encode_floats, BATCH)}
        if quantize_rows_i8 is None:
            from services.common.wire.codec import quantize_i8

            self.missing.append("services.extractor.quantize.quantize_rows_i8")
            self.apis["quantize"] = "services.common.wire.codec.quantize_i8 (numpy), per image"
            floats = [row.numpy() for row in self.features]
            quantize_ms = self._per_image(lambda: [quantize_i8(row) for row in floats], BATCH)
            quantized = [quantize_i8(row) for row in floats]
        else:
            self.apis["quantize"] = f"services.extractor.quantize.quantize_rows_i8 (torch), per {BATCH}"
            quantize_ms = self._per_image(lambda: quantize_rows_i8(self.features), BATCH)
            values, scales = quantize_rows_i8(self.features)
            quantized = [(values[i].numpy(), scales[i].numpy()) for i in range(BATCH)]
        self.apis["encode"] = "FeatureCodec.encode_quantized, per image"
        backbone, mode, k = self.info.backbone, feature_pb2.GATHER_MODE_MIST, self.k

        def encode() -> None:
            for values, scales in quantized:
                self.codec.encode_quantized(values, scales, backbone=backbone, mode=mode, k=k)

        return {"quantize": quantize_ms, "encode": self._per_image(encode, BATCH)}

    def _encode_floats(self) -> None:
        backbone, mode = self.info.backbone, feature_pb2.GATHER_MODE_MIST
        for row in self.features:
            self.codec.encode(row.numpy(), backbone=backbone, mode=mode, k=self.k)

    # ---- (f) the answer: build the response and serialize it ----------------------------------------------------

    def _answer_all(self) -> None:
        for number in range(BATCH):
            extractor_pb2.ExtractResponse(item_id=f"c0-{number}", features=[self.answer]).SerializeToString()


def _optional_quantizer() -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    try:
        from services.extractor.quantize import quantize_rows_i8
    except ImportError:
        return None
    return quantize_rows_i8


def stage_sum_ms(stages_ms: dict[str, float | None], echo_ms: float) -> float:
    """The isolated stages plus the echo's CPU per message (gRPC's own share of a served image)."""
    return sum(value for value in stages_ms.values() if value is not None) + echo_ms
