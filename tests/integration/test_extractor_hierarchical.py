"""The extractor serving a hierarchical backbone (a tiny random pvt_v2 at 64 px) as a real gRPC server on 127.0.0.1
port 0: Describe's architecture and stages, MIST's k as a stage equal to hierarchical_gather's aggregates, every
stage's output and the last stage's equal to timm's forward_intermediates, the bytes of the three modes as Describe's
baselines say, modes of the other architecture refused, --input-size checks, and cache hits."""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from services.common.clients.extractor import ExtractorClient
from services.common.config import ConfigError
from services.common.errors import InvalidArgumentError
from services.common.pb import extractor_pb2, extractor_pb2_grpc, feature_pb2
from services.common.wire.codec import decode_feature, encoded_nbytes, float32_nbytes
from services.common.wire.gather_modes import StageShape, baseline_bytes_per_image
from services.extractor.backbone import LoadedBackbone
from services.extractor.hierarchical import hierarchical_gather
from services.extractor.preprocess import ImagePreprocessor
from services.extractor.server import load_configured_backbone
from tests.helpers.extractor import (
    ExtractorServer,
    extract_request,
    load_tiny_backbone,
    load_tiny_pvt,
    png_image,
    status_of,
    tiny_config,
    tiny_pvt_config,
)

MIST, STAGES, LAST_STAGE = (
    feature_pb2.GATHER_MODE_MIST,
    feature_pb2.GATHER_MODE_STAGES,
    feature_pb2.GATHER_MODE_LAST_STAGE,
)
# The tiny pvt_v2 at 64 px: stage s's grid and dims.
STAGE_SHAPES = (
    StageShape(256, 16, 16, 16),
    StageShape(64, 24, 8, 8),
    StageShape(16, 32, 4, 4),
    StageShape(4, 48, 2, 2),
)


@pytest.fixture(scope="module")
def backbone() -> LoadedBackbone:
    return load_tiny_pvt()


@pytest.fixture(scope="module")
def server(backbone: LoadedBackbone):
    with ExtractorServer(
        tiny_pvt_config(max_queue_delay_ms=1.0, cache_max_bytes=4 << 20), backbone=backbone
    ) as running:
        yield running


def extract_all(target: str, requests: list[extractor_pb2.ExtractRequest]) -> list[extractor_pb2.ExtractResponse]:
    async def run() -> list[extractor_pb2.ExtractResponse]:
        async with grpc.aio.insecure_channel(target) as channel:
            return [r async for r in extractor_pb2_grpc.ExtractorStub(channel).Extract(iter(requests))]

    return asyncio.run(run())


def preprocessed(backbone: LoadedBackbone, image: bytes) -> torch.Tensor:
    """[1, 3, 64, 64]: the image as the server normalises it."""
    return ImagePreprocessor(backbone.data_config).decode(image)[None]


def stage_tokens(backbone: LoadedBackbone, image: bytes) -> list[np.ndarray]:
    """timm's own stage outputs [D_s, H_s, W_s] as [T_s, D_s] tokens, row-major over the grid."""
    with torch.inference_mode():
        _, outputs = backbone.model.forward_intermediates(preprocessed(backbone, image))
    return [output[0].flatten(1).T.numpy() for output in outputs]


# ---------------------------------------------------------------------------------------------- describe


def test_describe_reports_the_architecture_its_stages_and_the_dense_baselines(server, backbone) -> None:
    with ExtractorClient(server.target) as client:
        info = client.describe()

    assert (info.architecture, info.stages) == ("hierarchical", STAGE_SHAPES)
    assert (info.num_blocks, info.tokens, info.dims, info.num_prefix_tokens) == (4, 4, 48, 0)
    assert (info.data_config.input_size, info.data_config.crop_pct, info.data_config.crop_mode) == ((3, 64, 64), 1.0,
                                                                                                    "squash")  # fmt: skip
    assert (
        info.baselines
        == baseline_bytes_per_image(backbone.geometry)
        == {"stages": 4 * (256 * 16 + 64 * 24 + 16 * 32 + 4 * 48), "last_stage": 4 * 4 * 48, "mist_f32": 4 * 4 * 48}
    )
    assert {m: server.metric("mist_extractor_baseline_bytes_per_image", method=m) for m in info.baselines} == (
        info.baselines
    )


def test_a_vit_still_describes_itself_as_a_vit() -> None:
    with ExtractorServer(tiny_config(), backbone=load_tiny_backbone()) as vit, ExtractorClient(vit.target) as client:
        info = client.describe()

    assert (info.architecture, info.stages, info.num_blocks) == ("vit", (), 4)


# ---------------------------------------------------------------------------------------------- features


def test_mist_k_is_a_stage_and_sends_hierarchical_gathers_aggregate(server, backbone) -> None:
    # Prepare
    image = png_image(10)
    expected = hierarchical_gather(backbone.model, preprocessed(backbone, image)).aggregates

    # Execute
    [response] = extract_all(server.target, [extract_request("a", image, ks=(4, 1, 2), mode=MIST)])

    # Assert
    assert [f.k for f in response.features] == [4, 1, 2]
    for feature in response.features:
        shape = STAGE_SHAPES[feature.k - 1]
        assert (feature.mode, tuple(feature.shape)) == (MIST, (shape.tokens, shape.dims))
        np.testing.assert_allclose(decode_feature(feature), expected[feature.k - 1][0].numpy(), rtol=1e-5, atol=1e-6)


def test_stages_sends_every_stage_output_with_k_the_stage(server, backbone) -> None:
    image = png_image(11)

    [response] = extract_all(server.target, [extract_request("s", image, ks=(), mode=STAGES)])

    assert [(f.k, f.mode, tuple(f.shape)) for f in response.features] == [
        (s, STAGES, (shape.tokens, shape.dims)) for s, shape in enumerate(STAGE_SHAPES, start=1)
    ]
    for feature, expected in zip(response.features, stage_tokens(backbone, image), strict=True):
        np.testing.assert_allclose(decode_feature(feature), expected, rtol=1e-5, atol=1e-6)


def test_last_stage_sends_the_last_of_forward_intermediates(server, backbone) -> None:
    image = png_image(12)

    [response] = extract_all(server.target, [extract_request("l", image, ks=(), mode=LAST_STAGE)])

    [feature] = response.features
    assert (feature.k, feature.mode, tuple(feature.shape)) == (0, LAST_STAGE, (4, 48))
    np.testing.assert_allclose(decode_feature(feature), stage_tokens(backbone, image)[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("codec", ["f32-none", "i8-zstd", "i8o-zstd"])
def test_the_three_modes_cost_what_describes_baselines_say(server, backbone, codec: str) -> None:
    # Prepare
    image = png_image(13)
    requests = [
        extract_request("mist", image, ks=(4,), mode=MIST, codec=codec),
        extract_request("stages", image, ks=(), mode=STAGES, codec=codec),
        extract_request("last_stage", image, ks=(), mode=LAST_STAGE, codec=codec),
    ]
    baselines = baseline_bytes_per_image(backbone.geometry)

    # Execute
    responses = extract_all(server.target, requests)

    # Assert: the float32 bytes each answer stands for are Describe's; what is sent follows them
    sent = {r.item_id: sum(encoded_nbytes(f) for f in r.features) for r in responses}
    stands_for = {r.item_id: sum(float32_nbytes(f) for f in r.features) for r in responses}
    assert stands_for == {
        "mist": baselines["mist_f32"],
        "stages": baselines["stages"],
        "last_stage": baselines["last_stage"],
    }
    headers = 200 * 4  # per tensor: shape, backbone id, codec, scales' framing
    if codec == "f32-none":
        assert all(stands_for[m] < sent[m] < stands_for[m] + headers for m in sent)
    else:  # int8: about a quarter, plus one float32 scale per token
        assert all(sent[m] < stands_for[m] / 2 for m in sent)
    assert sent["mist"] < sent["stages"] / 4 and sent["last_stage"] < sent["stages"] / 4


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("bad_request", "expected"),
    [
        *[
            (
                extract_request("bad", b"x", ks=(), mode=value),
                f"gather mode {name!r} is not served on a hierarchical "
                f"backbone; this backbone serves mist, stages, last_stage",
            )  # fmt: skip
            for name, value in [
                ("lst", feature_pb2.GATHER_MODE_LST),
                ("last", feature_pb2.GATHER_MODE_LAST),
                ("partial", feature_pb2.GATHER_MODE_PARTIAL),
                ("cls", feature_pb2.GATHER_MODE_CLS),
            ]
        ],
        (extract_request("bad", b"x", ks=(0,)), "k must be an integer in [1, 4] for a backbone with 4 stages; got 0"),
        (extract_request("bad", b"x", ks=(5,)), "k must be an integer in [1, 4] for a backbone with 4 stages; got 5"),
        (extract_request("bad", b"x", ks=(2,), mode=STAGES), "gather mode 'stages' takes no k; got ks=[2]"),
        (extract_request("bad", b"x", ks=(2,), mode=LAST_STAGE), "gather mode 'last_stage' takes no k"),
    ],
    ids=["lst", "last", "partial", "cls", "k=0", "k>S", "stages-with-ks", "last_stage-with-ks"],
)
def test_requests_a_pvt_v2_cannot_serve_are_invalid_argument_naming_the_item(server, bad_request, expected) -> None:
    # Prepare: a valid item first; its answer still arrives.
    requests = [extract_request("good", png_image(20), ks=(4,)), bad_request, extract_request("after", png_image(21))]

    # Execute
    answered, code, details = status_of(server.target, requests)

    # Assert
    assert (answered, code) == (["good"], grpc.StatusCode.INVALID_ARGUMENT)
    assert details.startswith("item #1 (item_id 'bad'): ") and expected in details


@pytest.mark.parametrize("mode", [STAGES, LAST_STAGE])
def test_hierarchical_modes_on_a_vit_are_invalid_argument(mode: int) -> None:
    with ExtractorServer(tiny_config(), backbone=load_tiny_backbone()) as vit:
        answered, code, details = status_of(vit.target, [extract_request("bad", png_image(22), ks=(), mode=mode)])

    assert (answered, code) == ([], grpc.StatusCode.INVALID_ARGUMENT)
    assert "is not served on a vit backbone; this backbone serves mist, lst, last, partial, cls" in details


@pytest.mark.parametrize("size", [48, 16, 100])
def test_an_input_size_not_a_multiple_of_32_is_a_config_error(size: int) -> None:
    with pytest.raises(ConfigError, match=f"--input-size .*MIST_INPUT_SIZE.*multiple of 32.*got {size}"):
        tiny_pvt_config(input_size=size).check()


def test_an_input_size_with_a_vit_points_to_its_img_size() -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"--input-size is for hierarchical backbones.*--model-kwargs.*img_size"
    ):
        load_configured_backbone(tiny_config(input_size=64))


def test_a_non_square_photo_is_squashed_whole_to_the_input_size(backbone) -> None:
    # Prepare: a 90x50 photo-like image (a gradient with noise), wider than tall
    rng = np.random.default_rng(3)
    gradient = np.linspace(0, 255, 90)[None, :, None] * np.ones((50, 1, 3))
    pixels = np.clip(gradient + rng.normal(0, 20, (50, 90, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")

    # Execute
    loaded = {resize: ImagePreprocessor(backbone.data_config, resize=resize).load_uint8(buffer.getvalue())
              for resize in ("torch", "pillow")}  # fmt: skip

    # Assert: 64x64, and squashed (not cropped): the left edge stays dark, the right edge bright
    for tensor in loaded.values():
        assert tuple(tensor.shape) == (3, 64, 64)
        assert tensor[:, :, :4].float().mean() < 40 and tensor[:, :, -4:].float().mean() > 215
    assert torch.equal(loaded["torch"], loaded["pillow"])  # squash always resizes with Pillow


# ---------------------------------------------------------------------------------------------- cache


def test_the_hierarchical_modes_are_served_from_the_cache(server) -> None:
    # Prepare
    requests = [
        extract_request("m", png_image(30), ks=(1, 4), mode=MIST, codec="i8o-zstd"),
        extract_request("s", png_image(30), ks=(), mode=STAGES, codec="i8o-zstd"),
        extract_request("l", png_image(30), ks=(), mode=LAST_STAGE, codec="i8o-zstd"),
    ]
    first = extract_all(server.target, requests)
    hits = server.metric("mist_extractor_cache_hits_total")

    # Execute
    second = extract_all(server.target, requests)

    # Assert
    assert server.metric("mist_extractor_cache_hits_total") - hits == 3
    assert [r.cache_hit for r in first] == [False] * 3 and [r.cache_hit for r in second] == [True] * 3
    assert [[f.SerializeToString() for f in r.features] for r in second] == [
        [f.SerializeToString() for f in r.features] for r in first
    ]
    assert [len(r.features) for r in second] == [2, 4, 1]
