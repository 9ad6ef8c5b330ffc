"""Deterministic synthetic image classes, written as a real ImageFolder tree, for the demo, tests and benchmarks.

Nothing in the suite may download a dataset, so this draws its own: `python -m services.tuner.synthetic OUT_DIR`.
Two kinds: `shapes` (the default: objects a person tells apart at a glance, on cluttered colour backgrounds) and
`glyphs` (`--kind glyphs`: handwriting-like grayscale digits whose class lies in a few thin strokes, the kind of
low-level task where a linear model on raw pixels is a strong baseline; docs/explanation/recipe.md).
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import hashlib
import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from services.common.errors import InvalidArgumentError

# Each class is told apart by one cue a person sees at a glance: shape (circle, triangle), orientation
# (stripes), count (dots) or colour (two crosses that differ only in colour).
CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "triangle",
    "horizontal_stripes",
    "vertical_stripes",
    "two_dots",
    "three_dots",
    "red_cross",
    "blue_cross",
)
# Ten handwriting-like digits: the class is in the strokes (a closed loop or an open arc, one stroke more or
# less), drawn thin, in grayscale, with per-image jitter of every control point, slant, size, place and ink.
GLYPH_CLASS_NAMES: tuple[str, ...] = tuple(f"digit_{digit}" for digit in range(10))
SPLITS: tuple[str, ...] = ("train", "val", "test")
Kind = Literal["shapes", "glyphs"]
KINDS: tuple[Kind, ...] = ("shapes", "glyphs")
ImageFormat = Literal["png", "jpeg"]
MIN_IMAGE_SIZE = 32  # below this a dot is a couple of pixels and the classes stop being recognisable
MAX_IMAGE_SIZE = 1024  # a guard against typos: nothing in the suite needs bigger images
MAX_IMAGES_PER_SPLIT = 100_000  # file names carry a 5-digit index, so listings sort in order
MANIFEST_NAME = "manifest.csv"
MARKER_NAME = ".mist-synthetic.json"  # written first, so a half-written tree is still recognised as ours
# Bump when rendering changes: a directory made by another version is then refused, not silently mixed.
GENERATOR_VERSION = 1
GLYPHS_VERSION = 1  # the same rule for the glyph renderer (its marker also names the kind)
_EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg"}
_JPEG_QUALITY = 90  # high enough that the colour cue survives chroma subsampling
_PNG_COMPRESS_LEVEL = 6  # fixed, so the bytes do not depend on Pillow's default
_MIN_CONTRAST = 0.35  # RGB distance (0..sqrt 3) an object keeps from nearly all its background; 0.3 left faint ones
_DOT_TRIES = 200  # candidate positions tried before dots fall back to a fixed row
_BACKGROUND_TRIES = 32  # backgrounds drawn before falling back to the object's complement

Polygon = np.ndarray  # [n, 2] float vertices in unit coordinates: (0, 0) top-left, (1, 1) bottom-right
Colour = np.ndarray  # [3] float RGB in 0..1


@dataclass(frozen=True)
class SplitSizes:
    """Images per class in each split."""

    train: int  # images per class the edge network is trained on
    val: int  # images per class used to pick k and hyperparameters
    test: int  # images per class held out for the final accuracy

    def __post_init__(self) -> None:
        for split in SPLITS:
            count = getattr(self, split)
            if isinstance(count, bool) or not isinstance(count, int):
                raise InvalidArgumentError(f"split size {split} must be an integer, got {count!r}")
            if not 1 <= count <= MAX_IMAGES_PER_SPLIT:
                raise InvalidArgumentError(f"split size {split}={count} must be between 1 and {MAX_IMAGES_PER_SPLIT}")


@dataclass(frozen=True)
class DatasetSummary:
    """What `generate_dataset` left on disk."""

    root: Path  # the dataset directory; manifest paths are relative to it
    classes: tuple[str, ...]  # class names in label order
    counts: dict[str, int]  # images per split, all classes together
    total_bytes: int  # size of every image and the manifest
    files_written: int  # files created or changed by this call (0 when the tree was already complete)

    def describe(self) -> str:
        """A few human-readable lines, as the command line prints them."""
        splits = ", ".join(f"{split} {count}" for split, count in self.counts.items())
        return (
            f"synthetic dataset in {self.root}\n"
            f"  classes ({len(self.classes)}): {', '.join(self.classes)}\n"
            f"  images: {splits}\n"
            f"  bytes: {self.total_bytes:,} ({self.files_written} files written, manifest {MANIFEST_NAME})"
        )


# ---------------------------------------------------------------- geometry (unit coordinates, angles in radians)


def _rotate(points: np.ndarray, angle: float, centre: tuple[float, float]) -> Polygon:
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    return points @ rotation.T + np.asarray(centre)


def _rectangle(centre: tuple[float, float], width: float, height: float, angle: float) -> Polygon:
    half_w, half_h = width / 2, height / 2
    corners = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
    return _rotate(corners, angle, centre)


def _regular_polygon(centre: tuple[float, float], radius: float, sides: int, angle: float) -> Polygon:
    theta = np.linspace(0.0, 2 * np.pi, sides, endpoint=False)
    ring = radius * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    return _rotate(ring, angle, centre)


def _segment(start: np.ndarray, end: np.ndarray, width: float) -> Polygon:
    delta = end - start
    centre = (start + end) / 2
    return _rectangle((centre[0], centre[1]), float(np.hypot(*delta)), width, float(np.arctan2(delta[1], delta[0])))


def _centre(rng: np.random.Generator, margin: float) -> tuple[float, float]:
    """A random point at least `margin` from every edge, so an object of that radius stays in frame."""
    low, high = margin, max(margin, 1.0 - margin)
    return float(rng.uniform(low, high)), float(rng.uniform(low, high))


# ---------------------------------------------------------------- colours


def _hsv(hue: float, saturation: float, value: float) -> Colour:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def _random_colour(rng: np.random.Generator) -> Colour:
    return _hsv(rng.uniform(), rng.uniform(0.5, 1.0), rng.uniform(0.55, 1.0))


def _object_colour(class_name: str, rng: np.random.Generator) -> Colour:
    # The two crosses differ only in colour, so their hues stay in narrow, clearly separate bands.
    if class_name == "red_cross":
        return _hsv(rng.uniform(-0.025, 0.025), rng.uniform(0.8, 1.0), rng.uniform(0.75, 1.0))
    if class_name == "blue_cross":
        return _hsv(rng.uniform(0.6, 0.67), rng.uniform(0.8, 1.0), rng.uniform(0.75, 1.0))
    return _random_colour(rng)


# ---------------------------------------------------------------- the class cues


def _draw_circle(rng: np.random.Generator) -> list[Polygon]:
    radius = rng.uniform(0.17, 0.3)
    return [_regular_polygon(_centre(rng, radius + 0.03), radius, 64, 0.0)]


def _draw_triangle(rng: np.random.Generator) -> list[Polygon]:
    radius = rng.uniform(0.22, 0.36)
    triangle = _regular_polygon((0.0, 0.0), radius, 3, rng.uniform(0, 2 * np.pi))
    triangle += rng.uniform(-0.08, 0.08, size=(3, 2)) * radius  # not always equilateral
    return [triangle + np.asarray(_centre(rng, radius + 0.02))]


def _draw_stripes(rng: np.random.Generator, base_angle: float) -> list[Polygon]:
    bars = int(rng.integers(3, 6))
    thickness = rng.uniform(0.055, 0.085)
    pitch = thickness * rng.uniform(2.0, 2.6)
    length = rng.uniform(0.5, 0.85)
    angle = base_angle + np.deg2rad(rng.uniform(-12, 12))
    extent = max(length, pitch * (bars - 1) + thickness) / 2
    centre = _centre(rng, extent * 0.85)  # bar ends may touch the border; the bars themselves stay visible
    offsets = (np.arange(bars) - (bars - 1) / 2) * pitch
    stripes = []
    for offset in offsets:
        local = _rectangle((0.0, float(offset)), length, thickness, 0.0)
        stripes.append(_rotate(local, angle, centre))
    return stripes


def _draw_dots(rng: np.random.Generator, count: int) -> list[Polygon]:
    radius = rng.uniform(0.065, 0.1)
    centres: list[np.ndarray] = []
    for _ in range(_DOT_TRIES):  # rejection sampling; the frame has room for many more dots than three
        candidate = np.asarray(_centre(rng, radius * 1.1 + 0.03))
        if all(np.hypot(*(candidate - other)) >= 2.8 * radius for other in centres):
            centres.append(candidate)
        if len(centres) == count:
            break
    else:  # never seen in practice; a diagonal row still shows the right count
        centres = [np.array([t, t]) for t in np.linspace(0.2, 0.8, count)]
    return [_regular_polygon((c[0], c[1]), radius * rng.uniform(0.9, 1.1), 40, 0.0) for c in centres]


def _draw_cross(rng: np.random.Generator) -> list[Polygon]:
    span = rng.uniform(0.42, 0.68)
    thickness = span * rng.uniform(0.2, 0.28)
    angle = np.deg2rad(rng.uniform(-15, 15))  # an upright plus, never tilted toward an "x"
    centre = _centre(rng, span / 2 + 0.03)
    return [_rectangle(centre, span, thickness, angle), _rectangle(centre, thickness, span, angle)]


_CUES: dict[str, Callable[[np.random.Generator], list[Polygon]]] = {
    "circle": _draw_circle,
    "triangle": _draw_triangle,
    "horizontal_stripes": lambda rng: _draw_stripes(rng, 0.0),
    "vertical_stripes": lambda rng: _draw_stripes(rng, np.pi / 2),
    "two_dots": lambda rng: _draw_dots(rng, 2),
    "three_dots": lambda rng: _draw_dots(rng, 3),
    "red_cross": _draw_cross,
    "blue_cross": _draw_cross,
}


# ---------------------------------------------------------------- clutter: thin, small, never a class cue


def _polyline(points: np.ndarray, width: float) -> list[Polygon]:
    return [_segment(points[i], points[i + 1], width) for i in range(len(points) - 1)]


def _clutter_item(rng: np.random.Generator) -> list[Polygon]:
    """A thin segment, chevron or zigzag: open strokes, so never a dot, bar, cross or filled shape at any size."""
    width = rng.uniform(0.012, 0.025)
    strokes = int(rng.integers(1, 4))
    step = rng.uniform(0.07, 0.16) if strokes == 1 else rng.uniform(0.06, 0.1)
    heading = rng.uniform(0, 2 * np.pi)
    turn = rng.choice([-1.0, 1.0])
    points = [np.asarray(_centre(rng, 0.05))]
    for _ in range(strokes):
        points.append(points[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
        # Sharp turns that alternate in direction: two strokes make a "V", three a "Z", never a closed ring.
        heading += turn * rng.uniform(np.deg2rad(100), np.deg2rad(150))
        turn = -turn
    return _polyline(np.stack(points), width)


# ---------------------------------------------------------------- rasterising


class _Canvas:
    """Float RGB image that polygons are composited onto with anti-aliased (supersampled) edges."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels
        self.size = pixels.shape[0]
        # Supersampling smooths edges; capped so that large images stay cheap to draw.
        self.supersample = max(1, min(4, 512 // self.size))

    def paint(self, colour: Colour, polygons: list[Polygon]) -> None:
        # Only the polygons' bounding box is rasterised and blended: most strokes cover a few percent of the image.
        corners = np.concatenate(polygons) * self.size
        left, top = np.floor(corners.min(0)).clip(0, self.size).astype(int)
        right, bottom = np.ceil(corners.max(0)).clip(0, self.size).astype(int)
        if right <= left or bottom <= top:
            return
        scale = self.supersample
        mask = Image.new("L", ((right - left) * scale, (bottom - top) * scale), 0)
        draw = ImageDraw.Draw(mask)
        for polygon in polygons:
            local = (polygon * self.size - (left, top)) * scale
            draw.polygon([tuple(point) for point in local.tolist()], fill=255)
        alpha = np.asarray(mask.resize((right - left, bottom - top), Image.Resampling.BOX), dtype=np.float32) / 255
        alpha = alpha[..., None]
        region = self.pixels[top:bottom, left:right]
        self.pixels[top:bottom, left:right] = region * (1 - alpha) + colour.astype(np.float32) * alpha


def _gradient_with_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear gradient between two random colours at a random angle, plus smooth low-frequency colour noise."""
    ends = [_hsv(rng.uniform(), rng.uniform(0.0, 0.7), rng.uniform(0.1, 0.95)) for _ in range(2)]
    angle = rng.uniform(0, 2 * np.pi)
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    along = np.cos(angle) * grid[None, :] + np.sin(angle) * grid[:, None]
    along = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    pixels = ends[0][None, None, :] * (1 - along[..., None]) + ends[1][None, None, :] * along[..., None]
    cells = int(rng.integers(3, 7))
    coarse = rng.normal(0.0, rng.uniform(0.04, 0.12), size=(cells, cells, 3))
    noise = Image.fromarray(((coarse + 0.5).clip(0, 1) * 255).astype(np.uint8), "RGB")
    smooth = np.asarray(noise.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255 - 0.5
    return (pixels + smooth).clip(0, 1).astype(np.float32)


def _background(rng: np.random.Generator, size: int, avoid: Colour) -> np.ndarray:
    """A background on which an object of colour `avoid` stands out wherever it lands."""
    for _ in range(_BACKGROUND_TRIES):
        pixels = _gradient_with_noise(rng, size)
        if _contrast(pixels, avoid) >= _MIN_CONTRAST:
            return pixels
    return np.tile((1.0 - avoid).astype(np.float32), (size, size, 1))  # rare; the complement always contrasts


def _contrast(pixels: np.ndarray, colour: Colour) -> float:
    """RGB distance between `colour` and the background, at the 5 % of pixels closest to it (on a 1-in-4 grid)."""
    sample = pixels[::4, ::4]  # the background is smooth, so a sparse grid sees the same colours, 16x cheaper
    return float(np.quantile(np.linalg.norm(sample - colour.astype(np.float32), axis=-1), 0.05))


def _check_class(class_name: str) -> None:
    if class_name not in _CUES:
        raise InvalidArgumentError(f"unknown class {class_name!r}; known classes: {', '.join(CLASS_NAMES)}")


def _check_image_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise InvalidArgumentError(
            f"image size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels, got {size!r}"
        )


def render_image(class_name: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One RGB picture of `class_name`: background, clutter behind, the class cue, clutter in front, pixel noise."""
    _check_class(class_name)
    _check_image_size(size)
    colour = _object_colour(class_name, rng)
    canvas = _Canvas(_background(rng, size, avoid=colour))
    clutter = int(rng.integers(3, 9))
    in_front = int(rng.integers(0, 3))  # a few strokes cross the object, so it is never perfectly clean
    for _ in range(clutter - in_front):
        canvas.paint(_random_colour(rng), _clutter_item(rng))
    canvas.paint(colour, _CUES[class_name](rng))
    for _ in range(in_front):
        canvas.paint(_random_colour(rng), _clutter_item(rng))
    noisy = canvas.pixels + rng.normal(0.0, rng.uniform(0.02, 0.06), size=canvas.pixels.shape)
    return Image.fromarray(np.rint(noisy.clip(0, 1) * 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- glyphs: handwriting-like digits


def _arc(centre: tuple[float, float], radii: tuple[float, float], start: float, end: float, points: int) -> np.ndarray:
    """Points along an ellipse from angle `start` to `end` in degrees (0 = right, 90 = down: image y points down)."""
    theta = np.deg2rad(np.linspace(start, end, points))
    return np.stack([centre[0] + radii[0] * np.cos(theta), centre[1] + radii[1] * np.sin(theta)], axis=1)


def _line(*points: tuple[float, float]) -> np.ndarray:
    return np.array(points, dtype=np.float64)


# Each digit as polylines in a unit box (x right, y down), the way a pen writes it. Several pairs differ by one
# stroke or by an arc being open or closed (3 / 8, 5 / 6, 1 / 7, 4 / 9), so the class is in a few pixels.
_GLYPH_STROKES: dict[str, tuple[np.ndarray, ...]] = {
    "digit_0": (_arc((0.5, 0.5), (0.42, 0.47), -90, 270, 28),),
    "digit_1": (_line((0.28, 0.24), (0.56, 0.04), (0.56, 0.96)),),
    "digit_2": (np.concatenate([_arc((0.5, 0.3), (0.4, 0.26), 190, 390, 14), _line((0.08, 0.96), (0.94, 0.96))]),),
    "digit_3": (
        np.concatenate(
            [_arc((0.48, 0.27), (0.38, 0.23), 205, 450, 14), _arc((0.48, 0.73), (0.42, 0.25), 270, 515, 14)]
        ),
    ),
    "digit_4": (_line((0.72, 0.96), (0.72, 0.04), (0.06, 0.68), (0.96, 0.68)),),
    "digit_5": (
        np.concatenate([_line((0.88, 0.04), (0.22, 0.04), (0.17, 0.46)), _arc((0.5, 0.7), (0.4, 0.27), 225, 515, 16)]),
    ),
    "digit_6": (np.concatenate([_line((0.76, 0.04), (0.36, 0.28)), _arc((0.5, 0.7), (0.34, 0.26), 205, 565, 22)]),),
    "digit_7": (_line((0.06, 0.04), (0.94, 0.04), (0.4, 0.96)),),
    "digit_8": (_arc((0.5, 0.27), (0.32, 0.23), 90, 450, 20), _arc((0.5, 0.73), (0.4, 0.25), -90, 270, 22)),
    "digit_9": (np.concatenate([_arc((0.5, 0.3), (0.34, 0.26), 0, 360, 22), _line((0.84, 0.3), (0.78, 0.96))]),),
}


def _wobble(rng: np.random.Generator, points: np.ndarray, amplitude: float) -> np.ndarray:
    """A smooth random displacement field (two plane waves per axis): strokes bend as a hand would bend them,
    while neighbouring points move together (independent per-point noise would make zigzags no pen draws)."""
    moved = points.copy()
    for axis in range(2):
        for _ in range(2):
            direction = rng.normal(size=2)
            frequency = rng.uniform(0.5, 1.5) / max(float(np.hypot(*direction)), 1e-6)
            moved[:, axis] += amplitude * np.sin(
                2 * np.pi * frequency * (points @ direction) + rng.uniform(0, 2 * np.pi)
            )
    return moved


def _stroke_polygons(points: np.ndarray, width: float) -> list[Polygon]:
    """A polyline as segments plus a round cap on every vertex, so joints and ends look like pen strokes."""
    caps = [_regular_polygon((float(x), float(y)), width / 2, 12, 0.0) for x, y in points]
    return _polyline(points, width) + caps


def render_glyph(class_name: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One grayscale ("L") picture of a handwriting-like digit: light strokes on a dark, noisy background.

    Per image: every stroke bent by a smooth random field, then a random height (55-80 % of the frame), width,
    slant, small rotation and place; stroke width 5-9 % of the side (1.6-2.9 px at 32 px); background, ink and
    pixel noise levels; and 0-2 short stray pen marks. The class is never in the colour or the place.
    """
    if class_name not in _GLYPH_STROKES:
        raise InvalidArgumentError(f"unknown glyph class {class_name!r}; known classes: {', '.join(GLYPH_CLASS_NAMES)}")
    _check_image_size(size)
    height = rng.uniform(0.55, 0.8)
    width = height * rng.uniform(0.5, 0.75)
    slant = rng.uniform(-0.3, 0.3)  # x shifts with height, as in italic handwriting
    angle = np.deg2rad(rng.uniform(-10, 10))
    stroke = rng.uniform(0.05, 0.09)
    half = 0.5 * max(height, width + abs(slant) * height) + stroke
    centre = _centre(rng, min(half, 0.5))
    strokes = []
    for unit in _GLYPH_STROKES[class_name]:
        bent = _wobble(rng, unit, amplitude=0.04)
        local = np.stack(
            [(bent[:, 0] - 0.5) * width + slant * (0.5 - bent[:, 1]) * height, (bent[:, 1] - 0.5) * height], 1
        )
        strokes.append(_rotate(local, angle, centre))
    background, ink = rng.uniform(0.0, 0.3), rng.uniform(0.7, 1.0)
    canvas = _Canvas(np.full((size, size, 3), background, dtype=np.float32))
    canvas.paint(np.full(3, ink), [polygon for points in strokes for polygon in _stroke_polygons(points, stroke * 1.0)])
    for _ in range(int(rng.integers(0, 3))):  # stray marks: short, thinner, fainter, anywhere
        start = np.asarray(_centre(rng, 0.05))
        end = start + rng.uniform(0.04, 0.1) * np.array([np.cos(heading := rng.uniform(0, 2 * np.pi)), np.sin(heading)])
        canvas.paint(np.full(3, rng.uniform(0.3, 0.6)), _stroke_polygons(np.stack([start, end]), stroke * 0.7))
    noisy = canvas.pixels[..., 0] + rng.normal(0.0, rng.uniform(0.02, 0.08), size=(size, size))
    return Image.fromarray(np.rint(noisy.clip(0, 1) * 255).astype(np.uint8), "L")


# ---------------------------------------------------------------- the dataset on disk


def _stable_hash(text: str) -> int:
    # Python's hash() is salted per process; sha256 gives the same number on every run and machine.
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _image_rng(seed: int, split: str, class_name: str, index: int, kind: Kind = "shapes") -> np.random.Generator:
    """Each image's stream depends only on its own identity, so other classes or splits never shift it."""
    if kind == "shapes":  # unchanged since version 1: the shapes images stay byte-identical
        entropy = [seed, GENERATOR_VERSION, _stable_hash(split), _stable_hash(class_name), index]
    else:
        entropy = [seed, GLYPHS_VERSION, _stable_hash(kind), _stable_hash(split), _stable_hash(class_name), index]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _encode(image: Image.Image, image_format: ImageFormat) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    else:
        image.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Write through a temporary file and rename, so a reader never sees half an image; skip identical files."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    temporary.write_bytes(data)
    os.replace(temporary, path)
    return True


def class_names_of(kind: Kind) -> tuple[str, ...]:
    """Every class of a kind, in label order."""
    if kind not in KINDS:
        raise InvalidArgumentError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return CLASS_NAMES if kind == "shapes" else GLYPH_CLASS_NAMES


def _validate_classes(classes: Sequence[str], kind: Kind = "shapes") -> tuple[str, ...]:
    if isinstance(classes, str):  # "circle" would otherwise be read as six one-letter classes
        raise InvalidArgumentError(f"classes must be a sequence of names, not the string {classes!r}")
    names = tuple(classes)
    if len(names) < 2:
        raise InvalidArgumentError(f"a classification dataset needs at least 2 classes, got {list(names)}")
    known = class_names_of(kind)
    for name in names:
        if kind == "shapes":
            _check_class(name)
        elif name not in known:
            raise InvalidArgumentError(f"unknown {kind} class {name!r}; known classes: {', '.join(known)}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InvalidArgumentError(f"duplicate classes: {', '.join(duplicates)}")
    return names


def _claim_directory(root: Path, marker: dict[str, object]) -> None:
    """Create `root` or accept it when empty or made by this generator with the same arguments; refuse otherwise."""
    if root.exists() and not root.is_dir():
        raise InvalidArgumentError(f"{root} exists and is not a directory")
    marker_path = root / MARKER_NAME
    if root.is_dir() and any(root.iterdir()):
        if not marker_path.is_file():
            raise InvalidArgumentError(
                f"{root} is not empty and was not made by this generator; choose a new or empty directory"
            )
        try:
            previous = json.loads(marker_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InvalidArgumentError(
                f"{marker_path} is unreadable ({error}); delete {root} and generate again"
            ) from error
        if previous != marker:
            changed = sorted(key for key in marker.keys() | previous.keys() if marker.get(key) != previous.get(key))
            raise InvalidArgumentError(
                f"{root} holds a synthetic dataset made with other arguments (differs in: {', '.join(changed)}); "
                "choose a new directory or delete this one"
            )
    root.mkdir(parents=True, exist_ok=True)
    _write_if_changed(marker_path, (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode())


def generate_dataset(
    root: Path | str,
    *,
    classes: Sequence[str] | None = None,
    sizes: SplitSizes = SplitSizes(40, 10, 10),
    image_size: int = 64,
    seed: int = 0,
    image_format: ImageFormat = "png",
    kind: Kind = "shapes",
) -> DatasetSummary:
    """Write `root/{train,val,test}/<class>/<class>_<index:05d>.<ext>` and `root/manifest.csv` (path,label,split).

    `kind` "shapes" draws RGB images of CLASS_NAMES, "glyphs" grayscale digits of GLYPH_CLASS_NAMES; `classes`
    (default: all of the kind's, in order) picks a subset. The same arguments always give byte-identical files,
    and a second call with them rewrites nothing.
    """
    names = _validate_classes(class_names_of(kind) if classes is None else classes, kind)
    _check_image_size(image_size)
    if not isinstance(sizes, SplitSizes):
        raise InvalidArgumentError(f"sizes must be a SplitSizes, got {type(sizes).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidArgumentError(f"seed must be a non-negative integer, got {seed!r}")
    if image_format not in _EXTENSIONS:
        raise InvalidArgumentError(f"image format must be one of {', '.join(_EXTENSIONS)}, got {image_format!r}")
    root = Path(root)
    marker: dict[str, object] = {
        "generator": "mist-synthetic",
        "version": GENERATOR_VERSION if kind == "shapes" else GLYPHS_VERSION,
        "classes": list(names),
        "sizes": asdict(sizes),
        "image_size": image_size,
        "seed": seed,
        "image_format": image_format,
    }
    if kind != "shapes":  # a shapes marker stays as version 1 wrote it, so existing trees are still accepted
        marker["kind"] = kind
    render = render_image if kind == "shapes" else render_glyph
    _claim_directory(root, marker)
    rows: list[tuple[str, str, str]] = []
    total_bytes, files_written = 0, 0
    for split in SPLITS:
        for class_name in names:
            for index in range(getattr(sizes, split)):
                relative = f"{split}/{class_name}/{class_name}_{index:05d}.{_EXTENSIONS[image_format]}"
                image = render(class_name, _image_rng(seed, split, class_name, index, kind), image_size)
                data = _encode(image, image_format)
                files_written += _write_if_changed(root / relative, data)
                total_bytes += len(data)
                rows.append((relative, class_name, split))
    manifest = io.StringIO()
    writer = csv.writer(manifest, lineterminator="\n")  # "\n" on every OS, so the manifest is byte-identical too
    writer.writerow(("path", "label", "split"))
    writer.writerows(rows)
    manifest_bytes = manifest.getvalue().encode()
    files_written += _write_if_changed(root / MANIFEST_NAME, manifest_bytes)
    counts = {split: getattr(sizes, split) * len(names) for split in SPLITS}
    return DatasetSummary(root, names, counts, total_bytes + len(manifest_bytes), files_written)


# ---------------------------------------------------------------- command line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.tuner.synthetic",
        description="Write a deterministic synthetic ImageFolder dataset (train/val/test + manifest.csv).",
    )
    parser.add_argument(
        "out_dir", metavar="OUT_DIR", help="new or empty directory (or one this command made with the same flags)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="non-negative seed; same flags give byte-identical files (default 0)"
    )
    parser.add_argument("--train", type=int, default=40, help="training images per class (default 40)")
    parser.add_argument("--val", type=int, default=10, help="validation images per class (default 10)")
    parser.add_argument("--test", type=int, default=10, help="test images per class (default 10)")
    parser.add_argument(
        "--size", type=int, default=64, help=f"image side in pixels, {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (default 64)"
    )
    parser.add_argument("--format", choices=sorted(_EXTENSIONS), default="png", help="image file format (default png)")
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="shapes",
        help="shapes: RGB objects told apart at a glance; glyphs: grayscale handwriting-like digits (default shapes)",
    )
    parser.add_argument(
        "--classes",
        default="",
        help=f"comma-separated subset of the kind's classes; shapes: {', '.join(CLASS_NAMES)}; glyphs: "
        f"{', '.join(GLYPH_CLASS_NAMES)} (default: all of the kind's, in this order)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for bad arguments, as argparse does)."""
    args = _parse_args(argv)
    classes = [name.strip() for name in args.classes.split(",") if name.strip()]
    try:
        summary = generate_dataset(
            args.out_dir,
            kind=args.kind,
            classes=classes or None,
            sizes=SplitSizes(args.train, args.val, args.test),
            image_size=args.size,
            seed=args.seed,
            image_format=args.format,
        )
    except InvalidArgumentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
