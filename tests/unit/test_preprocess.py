"""ImagePreprocessor: timm's own eval transform, every colour mode, and bad input refused cheaply with the right reason;
the uint8 / normalize split and the device decode route (real photos and tolerances: test_preprocess_photos.py)."""

from __future__ import annotations

import io
import pickle
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps
from timm.data import create_transform, resolve_data_config
from timm.models import get_pretrained_cfg

from services.common.errors import InvalidArgumentError
from services.extractor import preprocess
from services.extractor.backbone import load_backbone
from services.extractor.preprocess import ImageDecodeError, ImagePreprocessor

# torchvision 0.29 deprecates decode_jpeg for TorchCodec; the device route uses it until TorchCodec ships here.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.io.image")
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


@pytest.fixture(scope="module")
def tiny_backbone():
    return load_backbone("vit_tiny_patch16_224", model_kwargs=TINY_VIT)


@pytest.fixture(scope="module")
def preprocessor(tiny_backbone) -> ImagePreprocessor:
    return ImagePreprocessor(tiny_backbone.data_config)


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def noise_image(width: int = 48, height: int = 36, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels)


def huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height: its rows are all zeros, so it deflates to a few KB."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_output_is_the_models_input_size_and_feeds_the_model(tiny_backbone, preprocessor) -> None:
    # Prepare
    png = encode(noise_image(), "PNG")

    # Execute
    tensor = preprocessor.decode(png)
    logits = tiny_backbone.model(tensor.unsqueeze(0))

    # Assert
    assert tensor.shape == (3, 32, 32)
    assert tensor.dtype == torch.float32
    assert tuple(tiny_backbone.data_config["input_size"]) == (3, 32, 32)
    assert logits.shape == (1, tiny_backbone.model.num_classes)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP"])
def test_decode_equals_timms_transform_on_the_pil_image(preprocessor, image_format: str) -> None:
    # Prepare
    data = encode(noise_image(), image_format)
    reference_transform = create_transform(**preprocessor.data_config, is_training=False)

    # Execute
    tensor = preprocessor.decode(data)

    # Assert
    expected = reference_transform(Image.open(io.BytesIO(data)).convert("RGB"))
    assert torch.equal(tensor, expected)


def test_vit_base_data_config_resizes_and_centre_crops_to_224() -> None:
    # Prepare: ViT-B/16's own config (bicubic, crop_pct 0.9), no model needed.
    config = resolve_data_config(pretrained_cfg=get_pretrained_cfg("vit_base_patch16_224").to_dict())
    preprocessor = ImagePreprocessor(config)
    data = encode(noise_image(320, 240), "PNG")

    # Execute
    tensor = preprocessor.decode(data)

    # Assert
    expected = create_transform(**config, is_training=False)(Image.open(io.BytesIO(data)).convert("RGB"))
    assert tensor.shape == (3, 224, 224)
    assert torch.equal(tensor, expected)


@pytest.mark.parametrize(
    ("mode", "image_format"),
    [
        ("L", "PNG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("1", "PNG"),
        ("LA", "PNG"),
        ("CMYK", "JPEG"),
        ("L", "JPEG"),
        ("RGBA", "WEBP"),
    ],
)
def test_every_colour_mode_becomes_rgb(preprocessor, mode: str, image_format: str) -> None:
    # Prepare
    image = noise_image(mode="RGB").convert(mode)
    data = encode(image, image_format)

    # Execute
    rgb = preprocessor.load_image(data)
    tensor = preprocessor.decode(data)

    # Assert
    assert rgb.mode == "RGB"
    assert rgb.size == (48, 36)
    assert tensor.shape == (3, 32, 32)
    assert torch.isfinite(tensor).all()


def test_rgba_drops_alpha_like_timms_datasets(preprocessor) -> None:
    # Prepare: a fully transparent red image; convert("RGB") keeps the colour, as timm's ImageDataset does.
    data = encode(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG")

    # Execute
    rgb = preprocessor.load_image(data)

    # Assert
    assert rgb.getpixel((3, 3)) == (255, 0, 0)


def test_sixteen_bit_grayscale_is_scaled_not_saturated(preprocessor) -> None:
    # Prepare: 40000 of 65535 is 61 % grey; Pillow's plain convert would clip it to white.
    data = encode(Image.fromarray(np.full((6, 6), 40000, dtype=np.uint16)), "PNG")

    # Execute
    rgb = preprocessor.load_image(data)

    # Assert
    assert rgb.getpixel((0, 0)) == (155, 155, 155)


def test_exif_orientation_is_applied(preprocessor) -> None:
    # Prepare: a 40x20 landscape JPEG tagged "rotate 90 degrees" (orientation 6) displays as 20x40 portrait.
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.new("RGB", (40, 20), (0, 0, 255)), "JPEG", exif=exif.tobytes())

    # Execute
    rgb = preprocessor.load_image(data)

    # Assert
    assert rgb.size == (20, 40)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_image"),
        (b"Hello, this is a plain text file.\nNot an image.\n" * 4, "undecodable_image"),
        (b"\xff\xd8\xff", "undecodable_image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, "undecodable_image"),
        (encode(noise_image(), "GIF"), "unsupported_format"),
        (encode(noise_image(), "TIFF"), "unsupported_format"),
        (encode(noise_image(), "BMP"), "unsupported_format"),
    ],
    ids=["empty", "text", "jpeg-magic-only", "png-bad-header", "gif", "tiff", "bmp"],
)
def test_bad_bytes_get_the_right_reason(preprocessor, data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError) as caught:
        preprocessor.decode(data)
    assert caught.value.reason == reason
    assert str(caught.value)


def test_truncated_jpeg_is_undecodable(preprocessor) -> None:
    # Prepare
    data = encode(noise_image(200, 150), "JPEG", quality=95)

    # Execute
    with pytest.raises(ImageDecodeError) as caught:
        preprocessor.decode(data[: len(data) // 2])

    # Assert
    assert caught.value.reason == "undecodable_image"
    assert "JPEG" in caught.value.message


def test_corrupt_png_data_is_undecodable(preprocessor) -> None:
    # Prepare: flip bits inside the compressed pixel data.
    data = bytearray(encode(noise_image(), "PNG"))
    data[data.index(b"IDAT") + 10] ^= 0xFF

    # Execute
    with pytest.raises(ImageDecodeError) as caught:
        preprocessor.decode(bytes(data))

    # Assert
    assert caught.value.reason == "undecodable_image"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_huge_image_is_refused_from_its_header_without_decoding_pixels(preprocessor, monkeypatch) -> None:
    # Prepare: 10000x10000 = 100 MP (300 MB as RGB) in a few KB; any pixel decode would go through ImageFile.load.
    data = huge_png(10_000, 10_000)
    loads: list[object] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: loads.append(image) or real_load(image))

    # Execute
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError) as caught:
        preprocessor.decode(data)
    elapsed = time.perf_counter() - started
    _, peak_python_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # Assert
    assert len(data) < 64 * 1024
    assert caught.value.reason == "image_too_large"
    assert "10000x10000" in caught.value.message
    assert loads == []
    assert elapsed < 2.0  # microseconds of work; generous for a loaded machine
    assert peak_python_bytes < 4 * 1024 * 1024


def test_the_pixel_check_is_what_refuses_the_huge_image(monkeypatch) -> None:
    # Prepare: the same kind of PNG, small enough to be allowed, is decoded through ImageFile.load (the control).
    preprocessor = ImagePreprocessor({"input_size": (3, 32, 32)}, max_image_pixels=2000 * 2000)
    loads: list[object] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: loads.append(image) or real_load(image))

    # Execute
    tensor = preprocessor.decode(huge_png(2000, 2000))

    # Assert
    assert tensor.shape == (3, 32, 32)
    assert len(loads) >= 1


def test_pixel_limit_is_configurable(preprocessor) -> None:
    strict = ImagePreprocessor(preprocessor.data_config, max_image_pixels=48 * 36 - 1)
    with pytest.raises(ImageDecodeError) as caught:
        strict.decode(encode(noise_image(48, 36), "PNG"))
    assert caught.value.reason == "image_too_large"
    assert ImagePreprocessor(preprocessor.data_config, max_image_pixels=48 * 36).decode(
        encode(noise_image(48, 36), "PNG")
    ).shape == (3, 32, 32)


def test_byte_limit_is_checked_before_parsing(preprocessor) -> None:
    # Prepare: garbage over the limit is "too large", not "undecodable": nothing was parsed.
    limited = ImagePreprocessor(preprocessor.data_config, max_image_bytes=1000)

    # Execute
    with pytest.raises(ImageDecodeError) as caught:
        limited.decode(b"\x00" * 1001)

    # Assert
    assert caught.value.reason == "image_too_large"
    assert "1,001 bytes" in caught.value.message


def test_decode_error_converts_to_the_proto_item_error(preprocessor) -> None:
    # Prepare
    with pytest.raises(ImageDecodeError) as caught:
        preprocessor.decode(b"")

    # Execute
    item_error = caught.value.to_item_error()

    # Assert
    assert item_error.code == 3  # grpc.StatusCode.INVALID_ARGUMENT
    assert item_error.reason == "empty_image"
    assert item_error.message == "the image is empty (0 bytes)"
    assert isinstance(caught.value, InvalidArgumentError)
    assert pickle.loads(pickle.dumps(caught.value)).reason == "empty_image"


def test_an_image_over_a_size_limit_is_a_resource_exhausted_item_error(preprocessor) -> None:
    # Prepare: docs/reference/errors.md maps "over a size limit" to RESOURCE_EXHAUSTED; bad bytes stay INVALID_ARGUMENT.
    limited = ImagePreprocessor(preprocessor.data_config, max_image_bytes=1000)
    with pytest.raises(ImageDecodeError) as too_large:
        limited.decode(b"\x00" * 1001)
    with pytest.raises(ImageDecodeError) as corrupt:
        limited.decode(b"\x89PNG\r\n\x1a\n garbage")

    # Execute
    too_large_error, corrupt_error = too_large.value.to_item_error(), corrupt.value.to_item_error()

    # Assert
    assert (too_large_error.code, too_large_error.reason) == (8, "image_too_large")  # RESOURCE_EXHAUSTED
    assert (corrupt_error.code, corrupt_error.reason) == (3, "undecodable_image")  # INVALID_ARGUMENT


def test_decode_many_keeps_errors_in_their_slots(preprocessor) -> None:
    # Prepare
    good = encode(noise_image(), "PNG")

    # Execute
    results = preprocessor.decode_many([good, b"", memoryview(good), bytearray(b"GIF89a....")])

    # Assert
    assert [type(result).__name__ for result in results] == ["Tensor", "ImageDecodeError", "Tensor", "ImageDecodeError"]
    assert [result.reason for result in results if isinstance(result, ImageDecodeError)] == [
        "empty_image",
        "unsupported_format",
    ]
    assert torch.equal(results[0], results[2])


@pytest.mark.parametrize(
    "settings",
    [dict(max_image_bytes=0), dict(max_image_pixels=-5), dict(max_image_bytes=1.5), dict(max_image_pixels=True)],
)
def test_bad_limits_are_refused(preprocessor, settings: dict) -> None:
    with pytest.raises(InvalidArgumentError):
        ImagePreprocessor(preprocessor.data_config, **settings)


def test_data_config_without_input_size_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="input_size"):
        ImagePreprocessor({"mean": (0.5, 0.5, 0.5)})


def test_non_bytes_input_is_refused(preprocessor) -> None:
    with pytest.raises(InvalidArgumentError, match="must be bytes"):
        preprocessor.decode("not bytes")  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillows_decompression_bomb_guard_is_reported_as_too_large() -> None:
    # Prepare: our limit set past Pillow's own (2 x 89 MP), so Pillow refuses a 15000x15000 image at open.
    preprocessor = ImagePreprocessor({"input_size": (3, 32, 32)}, max_image_pixels=10**9)

    # Execute
    with pytest.raises(ImageDecodeError) as caught:
        preprocessor.decode(huge_png(15_000, 15_000))

    # Assert
    assert caught.value.reason == "image_too_large"
    assert "decompression bomb" in caught.value.message


def jpeg_with_size(width: int, height: int) -> bytes:
    """A small valid JPEG whose SOF header is rewritten to declare width x height (only the header is read)."""
    data = bytearray(encode(noise_image(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_load_uint8_is_timms_geometry_as_contiguous_chw_uint8(preprocessor) -> None:
    # Prepare
    data = encode(noise_image(48, 36), "PNG")
    geometry = create_transform(**preprocessor.data_config, is_training=False).transforms[:-2]
    image = Image.open(io.BytesIO(data)).convert("RGB")
    for step in geometry:
        image = step(image)

    # Execute
    pixels = preprocessor.load_uint8(data)

    # Assert
    assert pixels.shape == (3, 32, 32)
    assert (pixels.dtype, pixels.device.type, pixels.is_contiguous()) == (torch.uint8, "cpu", True)
    assert torch.equal(pixels, torch.from_numpy(np.array(image)).permute(2, 0, 1))


def test_normalize_is_timms_to_tensor_and_normalize_bit_for_bit() -> None:
    # Prepare: ImageNet mean / std, whose float32 division rounds differently from a multiply by 1 / std.
    preprocessor = ImagePreprocessor({"input_size": (3, 8, 8)})
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=(4, 3, 8, 8), dtype=np.uint8))
    to_tensor, normalize = create_transform(**preprocessor.data_config, is_training=False).transforms[-2:]

    # Execute
    normalised = preprocessor.normalize(batch)

    # Assert
    expected = torch.stack([normalize(to_tensor(image.permute(1, 2, 0).numpy())) for image in batch])
    assert normalised.dtype == torch.float32
    assert normalised.device == batch.device
    assert torch.equal(normalised, expected)


def test_normalize_caches_mean_and_std_per_device(preprocessor) -> None:
    # Prepare
    batch = torch.zeros((2, 3, 32, 32), dtype=torch.uint8)

    # Execute
    preprocessor.normalize(batch)
    first = preprocessor._stats_on(batch.device)
    preprocessor.normalize(batch)

    # Assert
    assert preprocessor._stats_on(batch.device) is first


@pytest.mark.parametrize(
    "batch",
    [
        torch.zeros((1, 3, 32, 32)),
        torch.zeros((3, 32, 32), dtype=torch.uint8),
        torch.zeros((1, 4, 32, 32), dtype=torch.uint8),
    ],
    ids=["float", "no-batch-dim", "four-channels"],
)
def test_normalize_refuses_what_is_not_a_uint8_rgb_batch(preprocessor, batch: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="uint8"):
        preprocessor.normalize(batch)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_exif_orientation_matches_pillows_table(orientation: int) -> None:
    # Prepare: a non-square, non-symmetric image, so every flip and rotation is distinguishable.
    pixels = np.random.default_rng(orientation).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = Image.open(io.BytesIO(encode(Image.fromarray(pixels), "PNG", exif=exif.tobytes())))

    # Execute
    oriented = preprocess._apply_exif_orientation(torch.from_numpy(pixels).permute(2, 0, 1), orientation)

    # Assert
    expected = np.asarray(ImageOps.exif_transpose(tagged))
    assert torch.equal(oriented.permute(1, 2, 0), torch.from_numpy(expected.copy()))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_load_on_device_applies_the_exif_orientation(orientation: int) -> None:
    # Prepare: a config whose geometry is the identity for the upright 24x40 image, so only decode and rotation count.
    stored = noise_image(40, 24, seed=orientation) if orientation == 3 else noise_image(24, 40, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    preprocessor = ImagePreprocessor({"input_size": (3, 24, 40), "crop_pct": 1.0, "crop_mode": "squash"})

    # Execute
    pixels = preprocessor.load_on_device(data, "cpu")

    # Assert: libjpeg-turbo in torchvision and in Pillow, same bytes: equal to a level at most.
    host = preprocessor.load_uint8(data)
    assert pixels.shape == host.shape == (3, 24, 40)
    assert (pixels.int() - host.int()).abs().max() <= 1


@pytest.mark.parametrize(
    ("image", "image_format"),
    [
        (noise_image(48, 36), "PNG"),
        (noise_image(48, 36, mode="RGBA"), "WEBP"),
        (noise_image(48, 36).convert("CMYK"), "JPEG"),  # Pillow's CMYK -> RGB, not libjpeg's
    ],
    ids=["png", "webp", "cmyk-jpeg"],
)
def test_load_on_device_takes_the_host_path_for_what_torchvision_would_colour_differently(
    preprocessor, monkeypatch, image: Image.Image, image_format: str
) -> None:
    # Prepare
    data = encode(image, image_format)
    monkeypatch.setattr(preprocess, "_decode_jpeg", lambda *_: pytest.fail("torchvision decode was called"))

    # Execute
    pixels = preprocessor.load_on_device(data, "cpu")

    # Assert
    assert torch.equal(pixels, preprocessor.load_uint8(data))


def test_load_on_device_takes_the_host_path_for_a_pillow_only_kernel(monkeypatch) -> None:
    # Prepare: torch has no lanczos; the exact Pillow result beats an approximation.
    preprocessor = ImagePreprocessor({"input_size": (3, 32, 32), "interpolation": "lanczos"})
    data = encode(noise_image(48, 36), "JPEG")
    monkeypatch.setattr(preprocess, "_decode_jpeg", lambda *_: pytest.fail("torchvision decode was called"))

    # Execute
    pixels = preprocessor.load_on_device(data, "cpu")

    # Assert
    assert torch.equal(pixels, preprocessor.load_uint8(data))


def test_a_jpeg_torchvision_refuses_is_decoded_by_pillow(preprocessor, monkeypatch) -> None:
    # Prepare: as if nvJPEG lacked this JPEG variant.
    data = encode(noise_image(48, 36), "JPEG")
    monkeypatch.setattr(preprocess, "_decode_jpeg", lambda *_: None)

    # Execute
    pixels = preprocessor.load_on_device(data, "cpu")

    # Assert
    assert torch.equal(pixels, preprocessor.load_uint8(data))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (encode(noise_image(200, 150), "JPEG", quality=95)[:3000], "undecodable_image"),
        (b"\xff\xd8\xff", "undecodable_image"),
        (b"", "empty_image"),
        (encode(noise_image(), "GIF"), "unsupported_format"),
    ],
    ids=["truncated-jpeg", "jpeg-magic-only", "empty", "gif"],
)
def test_load_on_device_gives_the_host_paths_error_reasons(preprocessor, data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError) as caught:
        preprocessor.load_on_device(data, "cpu")
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("scrambled_from", "verdict"),
    [(1 / 3, "undecodable_image"), (1 / 2, "decoded")],
    ids=["premature-end-of-scan", "extraneous-bytes-only"],
)
def test_a_corrupt_jpeg_gets_the_same_verdict_on_both_paths(preprocessor, scrambled_from: float, verdict: str) -> None:
    # Prepare: 200 scrambled bytes of entropy-coded data; libjpeg-turbo calls some corruptions fatal, some warnings.
    data = bytearray(encode(noise_image(200, 150), "JPEG", quality=95))
    start = int(len(data) * scrambled_from)
    data[start : start + 200] = bytes(byte ^ 0x55 for byte in data[start : start + 200])

    # Execute
    verdicts = []
    for load in (preprocessor.load_uint8, lambda image: preprocessor.load_on_device(image, "cpu")):
        try:
            load(bytes(data))
            verdicts.append("decoded")
        except ImageDecodeError as error:
            verdicts.append(error.reason)

    # Assert
    assert verdicts == [verdict, verdict]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_load_on_device_refuses_a_huge_jpeg_from_its_header(preprocessor, monkeypatch) -> None:
    # Prepare: a header declaring 10000x10000 = 100 MP; nothing may reach torchvision.
    monkeypatch.setattr(preprocess, "_decode_jpeg", lambda *_: pytest.fail("torchvision decode was called"))

    # Execute
    with pytest.raises(ImageDecodeError) as caught:
        preprocessor.load_on_device(jpeg_with_size(10_000, 10_000), "cpu")

    # Assert
    assert caught.value.reason == "image_too_large"
    assert "10000x10000" in caught.value.message


def test_load_on_device_refuses_non_bytes(preprocessor) -> None:
    with pytest.raises(InvalidArgumentError, match="must be bytes"):
        preprocessor.load_on_device("not bytes", "cpu")  # type: ignore[arg-type]


@pytest.mark.parametrize("resize", ["torch", "pillow"])
def test_load_uint8_many_equals_load_uint8_image_by_image(tiny_backbone, resize: str, monkeypatch) -> None:
    """Same-sized images are resized together (torch's kernels), large ones alone: every result is load_uint8's,
    bit for bit, and a bad image keeps its error in its own slot."""
    monkeypatch.setattr(preprocess, "_BATCH_RESIZE_MAX_PIXELS", 60 * 60)  # the 64 x 64 images go alone
    loader = ImagePreprocessor(tiny_backbone.data_config, resize=resize)
    images = [
        encode(noise_image(48, 36, seed=1), "PNG"),
        encode(noise_image(40, 40, seed=2), "JPEG", quality=90),
        b"not an image",
        encode(noise_image(48, 36, seed=3), "WEBP", lossless=True),
        encode(noise_image(64, 64, seed=4), "PNG"),
        encode(noise_image(48, 36, "L", seed=5), "PNG"),
        encode(noise_image(40, 40, seed=6), "PNG"),
        encode(noise_image(64, 64, seed=7), "JPEG"),
        encode(noise_image(32, 32, seed=8), "PNG"),  # already the input size: not resized, as Pillow does
    ]
    batch_sizes: list[int] = []
    resize_crop = preprocess._resize_crop_uint8

    def counted(batch, steps):
        batch_sizes.append(batch.shape[0])
        return resize_crop(batch, steps)

    monkeypatch.setattr(preprocess, "_resize_crop_uint8", counted)
    loaded = loader.load_uint8_many(images)
    # torch: one call per size of the small ones (48 x 36: 3 images, 40 x 40: 2, 32 x 32: 1), the two 64 x 64 alone
    assert sorted(batch_sizes) == ([1, 1, 1, 2, 3] if resize == "torch" else [])
    assert len(loaded) == len(images)
    for data, result in zip(images, loaded, strict=True):
        if data == b"not an image":
            assert isinstance(result, ImageDecodeError) and result.reason == "undecodable_image"
            continue
        expected = loader.load_uint8(data)
        assert isinstance(result, torch.Tensor) and result.is_contiguous()
        assert result.dtype == torch.uint8 and result.shape == expected.shape == (3, 32, 32)
        assert torch.equal(result, expected)
    assert loader.load_uint8_many([]) == []
