"""ImagePreprocessor on real photographs of many sizes, against timm's eval transform: the host path equals it bit for
bit; the device-resize path stays within the stated bound, and the bound catches a wrong resize, crop or orientation.

Run: .venv/bin/python -m pytest -q tests/unit/test_preprocess_photos.py
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import matplotlib.cbook
import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageOps
from timm.data import create_transform

from services.common.errors import InvalidArgumentError
from services.extractor.preprocess import ImagePreprocessor

# torchvision 0.29 deprecates decode_jpeg for TorchCodec; the device route uses it until TorchCodec ships here.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.io.image")

# The device path resizes with torch's antialiased kernels instead of Pillow's; its stated bound, in uint8 levels
# (docs/explanation/preprocessing.md). Measured on these photos and configs on the CPU: mean <= 0.21 levels, at most
# 0.06 % of values more than 2 levels apart, max 13 levels (bicubic) / 1 level (bilinear); normalised, mean <= 0.0035.
# A wrong kernel gives >= 1.19 levels and >= 12 % of values; a wrong crop_pct >= 16 levels; a 1-pixel shift >= 5.9.
DEVICE_MEAN_LEVELS = 0.5  # mean |device - timm| over every value of the [3, H, W] crop: 2.4x the worst measured
DEVICE_FAR_SHARE = 0.01  # share of values more than DEVICE_FAR_LEVELS apart: 17x the worst measured (0.06 %)
DEVICE_FAR_LEVELS = 2
DEVICE_MAX_LEVELS = 24  # bicubic overshoot near saturated edges: Pillow clamps to uint8 between its two passes
PHOTO = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")  # 512x600


def encode(image: Image.Image, image_format: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def rotated_with_exif_tag(image: Image.Image) -> bytes:
    """The photo stored on its side, tagged orientation 6 ("rotate 90 clockwise to display"), as phones write it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image.transpose(Image.Transpose.ROTATE_90), quality=92, exif=exif.tobytes())


PHOTOS: dict[str, bytes] = {
    "97x131": encode(PHOTO.crop((100, 80, 400, 500)).resize((97, 131), Image.Resampling.LANCZOS), quality=90),
    "224x224": encode(PHOTO.crop((0, 50, 512, 562)).resize((224, 224), Image.Resampling.LANCZOS), quality=90),
    "300x180-landscape": encode(PHOTO.crop((0, 100, 512, 407)).resize((300, 180), Image.Resampling.LANCZOS)),
    "180x320-portrait": encode(PHOTO.crop((50, 0, 387, 600)).resize((180, 320), Image.Resampling.LANCZOS)),
    "640x480": encode(PHOTO.crop((0, 0, 512, 384)).resize((640, 480), Image.Resampling.BICUBIC), quality=90),
    "1024x768-upscaled": encode(PHOTO.crop((0, 100, 512, 484)).resize((1024, 768), Image.Resampling.BICUBIC)),
    "333x390-grayscale": encode(PHOTO.convert("L").resize((333, 390), Image.Resampling.LANCZOS), quality=90),
    "256x300-png": encode(PHOTO.resize((256, 300), Image.Resampling.LANCZOS), "PNG"),
    "400x469-exif-rotated": rotated_with_exif_tag(PHOTO.resize((400, 469), Image.Resampling.LANCZOS)),
}


def vit_base_data_config() -> dict:
    with torch.device("meta"):  # the config only: no 86 M weights to initialise
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
    return timm.data.resolve_model_data_config(model)


VIT_BASE = vit_base_data_config()  # bicubic, crop_pct 0.9, mean = std = 0.5
CONFIGS: dict[str, dict] = {
    "vit-base": VIT_BASE,
    "crop-0.875": {**VIT_BASE, "crop_pct": 0.875},
    "crop-1.0": {**VIT_BASE, "crop_pct": 1.0},
    "bilinear": {**VIT_BASE, "interpolation": "bilinear"},
    "squash": {**VIT_BASE, "crop_mode": "squash"},
    "border": {**VIT_BASE, "crop_mode": "border"},
    "192x256-imagenet": {
        **VIT_BASE,
        "input_size": (3, 192, 256),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    },
}


@dataclass(frozen=True)
class LevelDifference:
    mean: float  # mean |a - b| in uint8 levels
    far_share: float  # share of values more than DEVICE_FAR_LEVELS apart
    max: int

    def within_bound(self) -> bool:
        return self.mean <= DEVICE_MEAN_LEVELS and self.far_share <= DEVICE_FAR_SHARE and self.max <= DEVICE_MAX_LEVELS


def level_difference(actual: torch.Tensor, expected: torch.Tensor) -> LevelDifference:
    assert actual.shape == expected.shape
    difference = (actual.int() - expected.int()).abs()
    return LevelDifference(
        mean=difference.float().mean().item(),
        far_share=(difference > DEVICE_FAR_LEVELS).float().mean().item(),
        max=int(difference.max()),
    )


def upright_rgb(data: bytes) -> Image.Image:
    """The photo as timm's evaluation reads it: Pillow decode, EXIF orientation applied, RGB."""
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


@functools.cache
def timm_reference(config_name: str, photo_name: str) -> torch.Tensor:
    """timm's whole eval transform: float32 [3, H, W]."""
    return create_transform(**CONFIGS[config_name], is_training=False)(upright_rgb(PHOTOS[photo_name]))


@functools.cache
def timm_uint8(config_name: str, photo_name: str) -> torch.Tensor:
    """timm's geometry alone (the transforms before ToTensor), as uint8 [3, H, W]."""
    image = upright_rgb(PHOTOS[photo_name])
    for step in create_transform(**CONFIGS[config_name], is_training=False).transforms[:-2]:
        image = step(image)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These tensors are small (150 k values); on a shared 2-core runner intra-op threads only add spin-waits
    (measured: 20 s with 2 threads under load, 5 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def preprocessors() -> dict[str, ImagePreprocessor]:
    return {name: ImagePreprocessor(config) for name, config in CONFIGS.items()}


@pytest.mark.parametrize("config_name", CONFIGS)
def test_host_path_equals_timms_transform_on_every_photo(preprocessors, config_name: str) -> None:
    # Prepare
    preprocessor = preprocessors[config_name]
    _, height, width = CONFIGS[config_name]["input_size"]

    for photo_name, data in PHOTOS.items():
        # Execute
        pixels = preprocessor.load_uint8(data)
        tensor = preprocessor.normalize(pixels[None])[0]

        # Assert: exactly timm's numbers, so the 1e-5 tolerance the brief allows is not needed.
        assert pixels.shape == (3, height, width), photo_name
        assert pixels.dtype == torch.uint8 and pixels.is_contiguous(), photo_name
        assert torch.equal(tensor, timm_reference(config_name, photo_name)), photo_name


def test_decode_is_normalize_of_load_uint8(preprocessors) -> None:
    # Prepare
    preprocessor = preprocessors["border"]
    data = PHOTOS["180x320-portrait"]

    # Execute
    tensor = preprocessor.decode(data)

    # Assert
    assert torch.equal(tensor, preprocessor.normalize(preprocessor.load_uint8(data)[None])[0])
    assert torch.equal(tensor, timm_reference("border", "180x320-portrait"))


def test_a_batch_of_photos_normalises_as_timm_does_one_by_one(preprocessors) -> None:
    # Prepare
    preprocessor = preprocessors["192x256-imagenet"]
    batch = torch.stack([preprocessor.load_uint8(data) for data in PHOTOS.values()])

    # Execute
    normalised = preprocessor.normalize(batch)

    # Assert
    expected = torch.stack([timm_reference("192x256-imagenet", photo_name) for photo_name in PHOTOS])
    assert normalised.shape == (len(PHOTOS), 3, 192, 256)
    assert normalised.dtype == torch.float32
    assert torch.equal(normalised, expected)


@pytest.mark.parametrize("config_name", CONFIGS)
def test_device_resize_path_is_within_the_stated_bound_of_timm(preprocessors, config_name: str) -> None:
    # Prepare
    preprocessor = preprocessors[config_name]

    for photo_name, data in PHOTOS.items():
        # Execute
        pixels = preprocessor.load_on_device(data, "cpu")

        # Assert: in normalised units the bound is levels / 255 / std (0.004 for std 0.5, 0.009 for 0.225).
        difference = level_difference(pixels, timm_uint8(config_name, photo_name))
        assert difference.within_bound(), (photo_name, difference)
        assert pixels.dtype == torch.uint8 and pixels.is_contiguous(), photo_name


def test_png_takes_the_host_path_on_the_device_route(preprocessors) -> None:
    # Prepare
    preprocessor = preprocessors["vit-base"]
    data = PHOTOS["256x300-png"]

    # Execute
    pixels = preprocessor.load_on_device(data, "cpu")

    # Assert: no torch resize involved, so no difference at all.
    assert torch.equal(pixels, timm_uint8("vit-base", "256x300-png"))


@pytest.mark.parametrize(
    ("wrong_config", "what"),
    [
        ({**VIT_BASE, "interpolation": "bilinear"}, "bilinear instead of bicubic"),
        ({**VIT_BASE, "crop_pct": 0.875}, "crop_pct 0.875 instead of 0.9"),
        ({**VIT_BASE, "crop_mode": "squash"}, "squash instead of centre crop"),
    ],
)
def test_the_bound_catches_a_wrong_resize_or_crop(wrong_config: dict, what: str) -> None:
    # Prepare: the device path run with a wrong config, judged against timm's right one (4:3, so squash differs).
    wrong = ImagePreprocessor(wrong_config)

    # Execute
    difference = level_difference(wrong.load_on_device(PHOTOS["640x480"], "cpu"), timm_uint8("vit-base", "640x480"))

    # Assert
    assert not difference.within_bound(), what


@pytest.mark.parametrize("axis", [-1, -2])
def test_the_bound_catches_a_one_pixel_shift(preprocessors, axis: int) -> None:
    # Prepare
    pixels = preprocessors["vit-base"].load_on_device(PHOTOS["97x131"], "cpu")
    reference = timm_uint8("vit-base", "97x131")

    # Execute: the crop window moved by one pixel (the edge row / column repeated).
    shifted = torch.cat([pixels.narrow(axis, 1, pixels.shape[axis] - 1), pixels.narrow(axis, -1, 1)], dim=axis)

    # Assert
    assert level_difference(pixels, reference).within_bound()
    assert not level_difference(shifted, reference).within_bound()


def test_the_bound_catches_an_ignored_exif_orientation(preprocessors) -> None:
    # Prepare: the same rotated photo with its orientation tag dropped; the device path must rotate like Pillow does.
    untagged = encode(Image.open(io.BytesIO(PHOTOS["400x469-exif-rotated"])), quality=92)

    # Execute
    pixels = preprocessors["vit-base"].load_on_device(untagged, "cpu")

    # Assert
    assert not level_difference(pixels, timm_uint8("vit-base", "400x469-exif-rotated")).within_bound()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA device")
def test_nvjpeg_decode_on_cuda_is_close_to_timm(preprocessors) -> None:
    # Prepare: nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's, so this bound is looser than the CPU one;
    # not yet measured on a GPU. It still fails a shifted or wrongly sized crop (>= 5.9 levels on these photos).
    preprocessor = preprocessors["vit-base"]

    for photo_name, data in PHOTOS.items():
        # Execute
        pixels = preprocessor.load_on_device(data, "cuda")

        # Assert
        difference = (pixels.cpu().int() - timm_uint8("vit-base", photo_name).int()).abs().float()
        assert pixels.device.type == "cuda" and pixels.dtype == torch.uint8, photo_name
        assert difference.mean() <= 2.0, photo_name


# ---------------------------------------------------------------------------------------------- resize="torch"

# The host path with torch's uint8 kernels (the extractor's default): the stated bound is at most 2 uint8 levels per
# value (2 / 255 / std in normalised units: 0.016 for std 0.5), more than 1 level on at most 0.01 % of the values and
# any difference on at most 3 %. Measured on these photos: max 2 levels (on 0.0013 % of values at worst), values
# differing at all: 0.5 % (vit-base), 0.7 % (crop 0.875), 1.6 % (bilinear) at worst.
TORCH_MAX_LEVELS = 2
TORCH_BEYOND_ONE_SHARE = 1e-4
TORCH_DIFFERING_SHARE = 0.03
TORCH_CONFIGS = ("vit-base", "crop-0.875", "crop-1.0", "bilinear")


@pytest.fixture(scope="module")
def torch_preprocessors() -> dict[str, ImagePreprocessor]:
    return {name: ImagePreprocessor(config, resize="torch") for name, config in CONFIGS.items()}


@pytest.mark.parametrize("config_name", TORCH_CONFIGS)
def test_torch_resize_on_the_host_is_within_the_stated_bound_of_timm_on_every_photo(
    torch_preprocessors, config_name: str
) -> None:
    # Prepare
    preprocessor = torch_preprocessors[config_name]

    for photo_name, data in PHOTOS.items():
        # Execute
        pixels = preprocessor.load_uint8(data)

        # Assert: timm's sizes and crop offsets, values within one level on a small share
        difference = (pixels.int() - timm_uint8(config_name, photo_name).int()).abs()
        assert pixels.dtype == torch.uint8 and pixels.is_contiguous(), photo_name
        assert int(difference.max()) <= TORCH_MAX_LEVELS, (photo_name, int(difference.max()))
        assert (difference > 1).float().mean().item() <= TORCH_BEYOND_ONE_SHARE, photo_name
        assert (difference > 0).float().mean().item() <= TORCH_DIFFERING_SHARE, photo_name
    assert preprocessor.resize == "torch"


@pytest.mark.parametrize("config_name", ["squash", "border", "192x256-imagenet"])
def test_geometries_torch_cannot_match_keep_pillows_kernels(torch_preprocessors, config_name: str) -> None:
    preprocessor = torch_preprocessors[config_name]

    pixels = preprocessor.load_uint8(PHOTOS["640x480"])

    assert preprocessor.resize == "pillow"
    assert torch.equal(pixels, timm_uint8(config_name, "640x480"))


def test_the_torch_resize_bound_catches_a_wrong_kernel_or_crop() -> None:
    # Prepare: the torch host path with a wrong config, judged against timm's right one
    reference = timm_uint8("vit-base", "640x480")
    wrong = {
        "bilinear instead of bicubic": {**VIT_BASE, "interpolation": "bilinear"},
        "crop_pct 0.875 instead of 0.9": {**VIT_BASE, "crop_pct": 0.875},
    }

    for what, config in wrong.items():
        # Execute
        pixels = ImagePreprocessor(config, resize="torch").load_uint8(PHOTOS["640x480"])

        # Assert
        assert int((pixels.int() - reference.int()).abs().max()) > TORCH_MAX_LEVELS, what


def test_an_unknown_resize_kernel_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="resize must be one of pillow, torch"):
        ImagePreprocessor(VIT_BASE, resize="lanczos")  # type: ignore[arg-type]
