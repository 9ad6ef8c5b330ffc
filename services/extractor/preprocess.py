"""Decode untrusted JPEG / PNG / WebP bytes safely and preprocess them with timm's own eval transform for the
backbone (resize, centre crop, normalise), so the extractor sees exactly what timm's evaluation would.

    preprocessor = ImagePreprocessor(backbone.data_config, max_image_bytes=20 << 20, max_image_pixels=40_000_000)
    try:
        tensor = preprocessor.decode(image_bytes)   # [3, H, W] float32 at data_config["input_size"]
    except ImageDecodeError as error:               # .reason: "image_too_large", "undecodable_image", ...
        item_error = error.to_item_error()          # RESOURCE_EXHAUSTED for image_too_large, else INVALID_ARGUMENT

Safety: the byte limit is checked before parsing and the pixel limit from the header before any pixel is decoded
(Pillow's DecompressionBombError is caught too); truncated files fail instead of being padded. Colour: every mode
becomes RGB as in timm's datasets (`convert("RGB")`), except 16-bit grayscale, scaled to 8 bits (value / 257)
instead of saturating; the EXIF orientation is applied; animated WebP / APNG give their first frame.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import create_transform

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
    """Bytes -> [3, H, W] float32 tensor with the backbone's timm eval transform; thread-safe (no mutable state)."""

    def __init__(
        self,
        data_config: Mapping[str, Any],
        *,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
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

    def decode(self, image_bytes: bytes | bytearray | memoryview) -> torch.Tensor:
        """Decode, convert to RGB and transform one image; raises ImageDecodeError with a reason."""
        return self.transform(self.load_image(image_bytes))

    def decode_many(self, images: Iterable[bytes | bytearray | memoryview]) -> list[torch.Tensor | ImageDecodeError]:
        """`decode` for each image; a bad image yields its ImageDecodeError in its slot instead of raising."""
        results: list[torch.Tensor | ImageDecodeError] = []
        for image_bytes in images:
            try:
                results.append(self.decode(image_bytes))
            except ImageDecodeError as error:
                results.append(error)
        return results

    def load_image(self, image_bytes: bytes | bytearray | memoryview) -> Image.Image:
        """The decoded RGB image (EXIF orientation applied), after every limit has been checked."""
        data = self._check_bytes(image_bytes)
        image_format = _sniff_format(data)
        image = _open_header(data, image_format)
        width, height = image.size
        if width * height > self.max_image_pixels:
            raise ImageDecodeError(
                "image_too_large",
                f"the image is {width}x{height} = {width * height:,} pixels; the limit is {self.max_image_pixels:,}",
            )
        return _decode_pixels(image, image_format)

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
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
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
