"""Decode untrusted JPEG / PNG / WebP bytes safely and preprocess them with timm's own eval transform for the
backbone, split so the host only decodes to uint8 and the float work runs per batch on the backbone's device.

    preprocessor = ImagePreprocessor(backbone.data_config, max_image_bytes=20 << 20, max_image_pixels=40_000_000)
    try:
        pixels = preprocessor.load_uint8(image_bytes)   # [3, H, W] uint8: decode, RGB, timm's resize + centre crop
    except ImageDecodeError as error:                   # .reason: "image_too_large", "undecodable_image", ...
        item_error = error.to_item_error()              # RESOURCE_EXHAUSTED for image_too_large, else INVALID_ARGUMENT
    batch = preprocessor.normalize(torch.stack(images).to(device))  # [B, 3, H, W] float32: timm's ToTensor + Normalize
    pixels = preprocessor.load_on_device(image_bytes, "cuda")       # JPEG decoded by nvJPEG; others via load_uint8

Safety: the byte limit is checked before parsing and the pixel limit from the header before any pixel is decoded
(Pillow's DecompressionBombError is caught too); truncated files fail instead of being padded. Colour: every mode
becomes RGB as in timm's datasets (`convert("RGB")`), except 16-bit grayscale, scaled to 8 bits (value / 257)
instead of saturating; the EXIF orientation is applied; animated WebP / APNG give their first frame.
`decode` (float32 [3, H, W]) equals timm's transform bit for bit with resize="pillow" (the default here); with
resize="torch" (the extractor's default) the host resizes with torch's uint8 kernels, within one level of Pillow's per
value and about twice as fast; load_on_device resizes with torch's float kernels, close to timm but not equal. What
runs where, and the tolerances: docs/explanation/preprocessing.md.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import create_transform
from timm.data.transforms import CenterCropOrPad
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from services.common.errors import InvalidArgumentError
from services.common.pb import feature_pb2

DecodeFailure = Literal["empty_image", "undecodable_image", "image_too_large", "unsupported_format"]

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024  # 20 MiB: a 40 MP JPEG at high quality is about 15 MB
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # 40 MP: 120 MB as decoded RGB, the most one decode may allocate
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP")  # Pillow format names

# gRPC status codes are fixed by the gRPC spec; core modules do not import grpc (see errors.py).
_GRPC_INVALID_ARGUMENT = 3
_GRPC_RESOURCE_EXHAUSTED = 8
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
# JPEG modes whose RGB conversion torchvision / nvJPEG do as Pillow does; CMYK / YCCK colours would differ.
_DEVICE_JPEG_MODES = frozenset({"RGB", "L"})
# Resize kernels torch has on tensors with Pillow's antialiasing; lanczos, box, hamming are Pillow-only, and torch's
# nearest picks other pixels than Pillow's.
_TENSOR_INTERPOLATIONS = frozenset({InterpolationMode.BILINEAR, InterpolationMode.BICUBIC})
ResizeKernel = Literal["pillow", "torch"]
# load_uint8_many resizes images up to this size together; larger ones alone, so that a batch of 32 large photos
# does not hold them all decoded at once (a 40 MP image is 120 MB as RGB).
_BATCH_RESIZE_MAX_PIXELS = 1 << 20
RESIZE_KERNELS: tuple[ResizeKernel, ...] = ("pillow", "torch")
_EXIF_ORIENTATION = 0x0112
# Leading bytes of image formats we recognise but do not accept, so the client learns "unsupported", not "corrupt".
_OTHER_FORMAT_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"%PDF", "PDF"),
)
_HEIF_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF"}
_BMP_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}


class ImageDecodeError(InvalidArgumentError):
    """One image could not be used. A per-item error: the stream carrying it goes on."""

    def __init__(self, reason: DecodeFailure, message: str) -> None:
        super().__init__(message)
        self.reason: DecodeFailure = reason  # machine-readable, the ItemError.reason on the wire
        self.message = message  # what a person can act on

    def __reduce__(self) -> tuple[type[ImageDecodeError], tuple[str, str]]:
        # Exceptions pickle as cls(*args); this one needs both fields (e.g. across a process pool).
        return (type(self), (self.reason, self.message))

    def to_item_error(self) -> feature_pb2.ItemError:
        """The proto a servicer puts in ExtractResponse.error: RESOURCE_EXHAUSTED for an image over a size limit
        (docs/reference/errors.md: the same bytes could pass on a server with higher limits), INVALID_ARGUMENT otherwise."""
        code = _GRPC_RESOURCE_EXHAUSTED if self.reason == "image_too_large" else _GRPC_INVALID_ARGUMENT
        return feature_pb2.ItemError(code=code, reason=self.reason, message=self.message)


class ImagePreprocessor:
    """Bytes -> [3, H, W] uint8 with timm's eval geometry, and uint8 batches -> float32 with timm's normalisation.

    Thread-safe: the only mutable state is a per-device cache of the mean / std tensors, filled idempotently.
    """

    def __init__(
        self,
        data_config: Mapping[str, Any],
        *,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        resize: ResizeKernel = "pillow",
    ) -> None:
        if resize not in RESIZE_KERNELS:
            raise InvalidArgumentError(f"resize must be one of {', '.join(RESIZE_KERNELS)}; got {resize!r}")
        for label, limit in (("max_image_bytes", max_image_bytes), ("max_image_pixels", max_image_pixels)):
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise InvalidArgumentError(f"{label} must be a positive integer; got {limit!r}")
        if "input_size" not in data_config:
            raise InvalidArgumentError(
                f"data_config needs an input_size (timm's resolved data config); got {dict(data_config)}"
            )
        self.data_config: dict[str, Any] = dict(data_config)
        self.input_size: tuple[int, int, int] = tuple(self.data_config["input_size"])  # type: ignore[assignment]
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.transform = create_transform(**self.data_config, is_training=False)
        self.geometry, normalize_step = _split_eval_transform(self.transform)
        # timm's own float32 tensors, so the batch arithmetic is the very one Normalize does.
        self._mean = normalize_step.mean.reshape(1, -1, 1, 1)
        self._std = normalize_step.std.reshape(1, -1, 1, 1)
        self._stats_by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._geometry_runs_on_tensors = all(
            getattr(step, "interpolation", InterpolationMode.BILINEAR) in _TENSOR_INTERPOLATIONS
            for step in self.geometry.transforms
        )
        # torch's uint8 resize kernels round like Pillow's (within one level) for the common eval geometry: a Resize of
        # the shorter side, then a CenterCrop. Other geometries (squash, border) keep Pillow's kernels.
        self._uint8_resize = _uint8_resize_steps(self.geometry) if resize == "torch" else None
        self.resize: ResizeKernel = "torch" if self._uint8_resize is not None else "pillow"

    def decode(self, image_bytes: bytes | bytearray | memoryview) -> torch.Tensor:
        """Decode, convert to RGB and transform one image to float32 [3, H, W]; raises ImageDecodeError with a reason.
        Equal to timm's eval transform on the decoded image, bit for bit."""
        return self.normalize(self.load_uint8(image_bytes)[None])[0]

    def decode_many(self, images: Iterable[bytes | bytearray | memoryview]) -> list[torch.Tensor | ImageDecodeError]:
        """`decode` for each image; a bad image yields its ImageDecodeError in its slot instead of raising."""
        results: list[torch.Tensor | ImageDecodeError] = []
        for image_bytes in images:
            try:
                results.append(self.decode(image_bytes))
            except ImageDecodeError as error:
                results.append(error)
        return results

    def load_uint8(self, image_bytes: bytes | bytearray | memoryview) -> torch.Tensor:
        """Decoded, RGB, resized and centre-cropped by timm's own transforms: uint8 [3, H, W], contiguous, on the CPU.

        Channels-first on the host: the transpose copies 1-byte values here instead of 4-byte floats on the device,
        and the stacked batch is already the contiguous NCHW that `normalize` and the model's patch embedding read.
        """
        image = self.load_image(image_bytes)
        if self._uint8_resize is not None:
            return _resize_uint8_with_torch(image, self._uint8_resize)
        return _pil_to_chw_uint8(self.geometry(image))

    def load_uint8_many(
        self, images: Sequence[bytes | bytearray | memoryview]
    ) -> list[torch.Tensor | ImageDecodeError]:
        """`load_uint8` of each image, in order; a bad image yields its ImageDecodeError in its slot.

        With torch's resize kernels, the images that decode to the same size are resized and cropped together, one
        kernel call per size instead of one per image (the Python around each call costs more than a small image's
        arithmetic); the kernel treats every image of a batch alone, so each result is bit for bit `load_uint8`'s.
        Images above 1 MP are resized one by one as soon as they are decoded, so a batch of large photos never holds
        more than one of them at full size.
        """
        results: list[torch.Tensor | ImageDecodeError | None] = []  # None: filled in by its size's batch below
        steps = self._uint8_resize
        by_size: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
        for index, image_bytes in enumerate(images):
            try:
                if steps is None:
                    results.append(self.load_uint8(image_bytes))
                    continue
                image = self.load_image(image_bytes)
                if image.width * image.height > _BATCH_RESIZE_MAX_PIXELS:  # alone, as soon as it is decoded
                    results.append(_resize_uint8_with_torch(image, steps))
                    continue
            except ImageDecodeError as error:
                results.append(error)
                continue
            results.append(None)
            pixels = np.asarray(image)  # [H, W, 3] uint8
            by_size.setdefault(pixels.shape, []).append((index, pixels))
        for members in by_size.values():
            # Channels-last, as one image's view is: torch's uint8 kernels read that layout without a copy.
            batch = torch.from_numpy(np.stack([pixels for _, pixels in members])).permute(0, 3, 1, 2)
            resized = _resize_crop_uint8(batch, steps)  # type: ignore[arg-type]  # by_size is empty without steps
            for (index, _), pixels in zip(members, resized, strict=True):
                results[index] = pixels
        return results  # type: ignore[return-value]  # every None was replaced

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] on any device -> float32 [B, 3, H, W] on that device: timm's ToTensor + Normalize,
        the same float32 operations in the same order (x / 255, - mean, / std), so on the CPU equal bit for bit."""
        if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != self._mean.shape[1]:
            channels = self._mean.shape[1]
            raise ValueError(
                f"normalize takes a uint8 [B, {channels}, H, W] batch; got {batch.dtype} {tuple(batch.shape)}"
            )
        mean, std = self._stats_on(batch.device)
        # One new float32 tensor, then in place: the batch is the largest tensor of the step, allocate it once.
        return batch.to(torch.float32).div_(255).sub_(mean).div_(std)

    def load_on_device(self, image_bytes: bytes | bytearray | memoryview, device: torch.device | str) -> torch.Tensor:
        """Like `load_uint8`, on `device`: a JPEG is decoded by torchvision there (nvJPEG on CUDA, libjpeg-turbo on
        the CPU), EXIF-oriented and resized / cropped by timm's transforms on the tensor (torch's antialiased
        kernels: close to Pillow's, not equal). Every limit is checked first, from the header. PNG / WebP, CMYK
        JPEGs, kernels other than bicubic / bilinear and JPEGs torchvision refuses take the host path,
        `load_uint8(...).to(device)`, which also names the reason when the bytes do not decode at all."""
        device = torch.device(device)
        data = self._check_bytes(image_bytes)
        image_format = _sniff_format(data)
        header = self._open_checked_header(data, image_format)
        if image_format != "JPEG" or header.mode not in _DEVICE_JPEG_MODES or not self._geometry_runs_on_tensors:
            return self._host_uint8(header, image_format).to(device)
        try:
            orientation = header.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # a malformed EXIF block: the host path reports it as Pillow does
            return self._host_uint8(header, image_format).to(device)
        pixels = _decode_jpeg(data, device)
        if pixels is None:
            # Corrupt, truncated, or a JPEG variant torchvision lacks: Pillow decodes it or names the reason.
            return self._host_uint8(header, image_format).to(device)
        return self._tensor_geometry(_apply_exif_orientation(pixels, orientation)).contiguous()

    def load_image(self, image_bytes: bytes | bytearray | memoryview) -> Image.Image:
        """The decoded RGB image (EXIF orientation applied), after every limit has been checked."""
        data = self._check_bytes(image_bytes)
        image_format = _sniff_format(data)
        return _decode_pixels(self._open_checked_header(data, image_format), image_format)

    def _host_uint8(self, header: Image.Image, image_format: str) -> torch.Tensor:
        return _pil_to_chw_uint8(self.geometry(_decode_pixels(header, image_format)))

    def _open_checked_header(self, data: bytes, image_format: str) -> Image.Image:
        image = _open_header(data, image_format)
        width, height = image.size
        if width * height > self.max_image_pixels:
            raise ImageDecodeError(
                "image_too_large",
                f"the image is {width}x{height} = {width * height:,} pixels; the limit is {self.max_image_pixels:,}",
            )
        return image

    def _tensor_geometry(self, pixels: torch.Tensor) -> torch.Tensor:
        """timm's geometric steps on a uint8 [3, H, W] tensor: same sizes and crop offsets, torch's kernels."""
        for step in self.geometry.transforms:
            if isinstance(step, CenterCropOrPad):
                # torchvision's v1 tensor pad takes one fill value; timm's border mode fills with the mean colour.
                pixels = _center_crop_or_pad_tensor(pixels, step.size, step.fill)
            else:
                pixels = step(pixels)
        return pixels

    def _stats_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        stats = self._stats_by_device.get(device)
        if stats is None:  # two threads may both copy; the second assignment is harmless
            stats = (self._mean.to(device), self._std.to(device))
            self._stats_by_device[device] = stats
        return stats

    def _check_bytes(self, image_bytes: object) -> bytes:
        if not isinstance(image_bytes, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError(f"image must be bytes; got {type(image_bytes).__name__}")
        size = memoryview(image_bytes).nbytes
        if size == 0:
            raise ImageDecodeError("empty_image", "the image is empty (0 bytes)")
        if size > self.max_image_bytes:
            raise ImageDecodeError(
                "image_too_large", f"the image is {size:,} bytes; the limit is {self.max_image_bytes:,}"
            )
        return bytes(image_bytes)


def _split_eval_transform(transform: transforms.Compose) -> tuple[transforms.Compose, transforms.Normalize]:
    """timm's eval Compose as (the PIL steps before ToTensor, the Normalize after it)."""
    steps = list(transform.transforms)
    # timm's MaybeToTensor subclasses torchvision's ToTensor.
    to_tensor_at = next((i for i, step in enumerate(steps) if isinstance(step, transforms.ToTensor)), None)
    if to_tensor_at != len(steps) - 2 or not isinstance(steps[-1], transforms.Normalize):
        raise InvalidArgumentError(f"the data_config's eval transform does not end in ToTensor, Normalize: {transform}")
    normalize_step = steps[-1]
    if torch.as_tensor(normalize_step.std).eq(0).any():
        raise InvalidArgumentError(f"the data_config's std has a zero: {normalize_step.std}")
    return transforms.Compose(steps[:to_tensor_at]), normalize_step


def _pil_to_chw_uint8(image: Image.Image) -> torch.Tensor:
    # np.asarray is Pillow's one copy out of its buffer (read-only); the transpose copy makes it CHW and writable.
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))


@dataclass(frozen=True)
class _TorchResize:
    """timm's Resize of the shorter side + CenterCrop, resolved once: what the torch uint8 path needs per image."""

    short_side: int  # the Resize's target for the image's shorter side
    mode: str  # "bicubic" or "bilinear", torch's name
    crop: list[int]  # the CenterCrop's [height, width]


def _uint8_resize_steps(geometry: transforms.Compose) -> _TorchResize | None:
    """The resolved steps when the geometry is exactly an aspect-keeping bicubic / bilinear resize then a crop."""
    steps = list(geometry.transforms)
    if len(steps) != 2 or type(steps[0]) is not transforms.Resize or type(steps[1]) is not transforms.CenterCrop:
        return None
    resize = steps[0]
    size = resize.size if isinstance(resize.size, int) else (resize.size[0] if len(resize.size) == 1 else None)
    # A (height, width) size squashes the image: torch's uint8 kernels then differ from Pillow's by up to 9 levels.
    if size is None or resize.interpolation not in _TENSOR_INTERPOLATIONS or resize.max_size is not None:
        return None
    return _TorchResize(short_side=size, mode=resize.interpolation.value, crop=list(steps[1].size))


def _resize_uint8_with_torch(image: Image.Image, steps: _TorchResize) -> torch.Tensor:
    """timm's Resize + CenterCrop with torch's antialiased uint8 kernels: the same sizes and crop offsets as Pillow's
    path, values within 2 levels of it (docs/explanation/preprocessing.md has the measured tolerances)."""
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a writable copy, viewed as channels-last CHW
    return _resize_crop_uint8(pixels[None], steps)[0]


def _resize_crop_uint8(batch: torch.Tensor, steps: _TorchResize) -> torch.Tensor:
    """`_resize_uint8_with_torch` of a [B, 3, H, W] uint8 batch of one size: [B, 3, h, w], contiguous."""
    height, width = batch.shape[-2:]
    size = transforms.functional._compute_resized_output_size((height, width), [steps.short_side], None)
    if list(size) != [height, width]:  # Pillow returns the image itself at its own size: so must we
        batch = torch.nn.functional.interpolate(batch, size=size, mode=steps.mode, antialias=True)
    return transforms.functional.center_crop(batch, steps.crop).contiguous()


def _decode_jpeg(data: bytes, device: torch.device) -> torch.Tensor | None:
    """uint8 [3, H, W] on `device`, or None where torchvision cannot decode these bytes."""
    decode_jpeg, rgb = _torchvision_jpeg_decoder()
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a writable copy: torch warns on read-only bytes
    try:
        return decode_jpeg(encoded, mode=rgb, device=device)
    except (RuntimeError, ValueError):  # what torchvision's C++ decoders raise for bytes they cannot decode
        return None


@functools.cache
def _torchvision_jpeg_decoder() -> tuple[Callable[..., torch.Tensor], Any]:
    """Imported on first use: only the device route loads torchvision's image extension (libjpeg / nvJPEG)."""
    # torchvision 0.29 deprecates its decoders for TorchCodec (not shipped here yet); the DeprecationWarning comes from
    # inside torchvision, which Python's default filters ignore, so no process-wide filter is installed.
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg, ImageReadMode.RGB


def _apply_exif_orientation(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """Pillow's ImageOps.exif_transpose on a [C, H, W] tensor (same table: 2..8; anything else is upright)."""
    if orientation == 2:  # FLIP_LEFT_RIGHT
        return pixels.flip(-1)
    if orientation == 3:  # ROTATE_180
        return pixels.flip(-2, -1)
    if orientation == 4:  # FLIP_TOP_BOTTOM
        return pixels.flip(-2)
    if orientation == 5:  # TRANSPOSE
        return pixels.transpose(-2, -1)
    if orientation == 6:  # ROTATE_270 (counter-clockwise), i.e. 90 degrees clockwise
        return torch.rot90(pixels, k=-1, dims=(-2, -1))
    if orientation == 7:  # TRANSVERSE
        return pixels.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # ROTATE_90 (counter-clockwise)
        return torch.rot90(pixels, k=1, dims=(-2, -1))
    return pixels


def _center_crop_or_pad_tensor(pixels: torch.Tensor, size: tuple[int, int], fill: Any) -> torch.Tensor:
    """timm's center_crop_or_pad with a per-channel fill: the same padding split and crop offsets."""
    from torchvision.transforms.v2 import functional as tensor_functional

    crop_height, crop_width = size
    image_height, image_width = pixels.shape[-2:]
    if crop_width > image_width or crop_height > image_height:
        pad_width, pad_height = max(crop_width - image_width, 0), max(crop_height - image_height, 0)
        padding_ltrb = [pad_width // 2, pad_height // 2, (pad_width + 1) // 2, (pad_height + 1) // 2]
        fill_values = [float(value) for value in fill] if isinstance(fill, (list, tuple)) else float(fill)
        pixels = tensor_functional.pad(pixels, padding_ltrb, fill=fill_values)
    return transforms.functional.center_crop(pixels, [crop_height, crop_width])


def _sniff_format(data: bytes) -> str:
    """The Pillow format name of a supported image, judged from its first bytes; raise for anything else."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    other = _other_format(data)
    if other:
        raise ImageDecodeError("unsupported_format", f"{other} images are not supported; send JPEG, PNG or WebP")
    raise ImageDecodeError("undecodable_image", f"not a JPEG, PNG or WebP image (starts with {data[:8]!r})")


def _other_format(data: bytes) -> str:
    for magic, name in _OTHER_FORMAT_MAGIC:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return _HEIF_BRANDS[data[8:12]]
    if data[:2] == b"BM" and len(data) >= 18 and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    return ""


def _open_header(data: bytes, image_format: str) -> Image.Image:
    """Parse only the header (Pillow opens lazily): size and mode are known, no pixel is decoded yet."""
    try:
        image = Image.open(io.BytesIO(data), formats=(image_format,))
    except Image.DecompressionBombError as error:
        raise ImageDecodeError("image_too_large", f"the image is too large to decode safely: {error}") from None
    except UnidentifiedImageError:  # its message names the BytesIO object (a memory address), not the problem
        raise ImageDecodeError(
            "undecodable_image",
            f"cannot read the {image_format} header: Pillow does not recognise it as {image_format}",
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageDecodeError("undecodable_image", f"cannot read the {image_format} header: {error}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(
            "undecodable_image", f"the {image_format} header declares an empty {width}x{height} image"
        )
    return image


def _decode_pixels(image: Image.Image, image_format: str) -> Image.Image:
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)
    except MemoryError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageDecodeError("image_too_large", f"the image is too large to decode safely: {error}") from None
    # Pillow's decoders signal bad data with OSError, SyntaxError, ValueError, struct.error, IndexError, zlib
    # errors...; whatever it is, these are untrusted bytes that do not decode, not a server fault.
    except Exception as error:
        raise ImageDecodeError(
            "undecodable_image", f"the {image_format} data is corrupt or truncated: {error}"
        ) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert clips 16-bit values to 255 (a white image); map the full 0..65535 range onto 0..255.
        wide = np.asarray(image).astype(np.uint32)
        image = Image.fromarray((np.clip(wide, 0, 65535) // 257).astype(np.uint8))  # uint8 2-D: mode L
    return image if image.mode == "RGB" else image.convert("RGB")
