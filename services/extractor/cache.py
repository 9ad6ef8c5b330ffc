"""An LRU cache of encoded extractor results, bounded in bytes: a hit skips decoding and the forward pass entirely.

    cache = FeatureCache(max_bytes=256 << 20)   # 0 disables it: every get misses, put stores nothing
    key = cache_key(backbone_id, image_sha256(image_bytes), "mist", 4, "f16-zstd")   # backbone_id: "name@fingerprint"
    data = cache.get(key)                        # bytes or None; a hit becomes the most recently used entry
    if data is None:
        cache.put(key, tensor.SerializeToString())   # False when the value alone exceeds max_bytes

Keys name everything that determines the bytes (backbone and weights, image content, gather mode, k, codec), so
a hit can never return features of other weights or another encoding; cache_key refuses empty parts. Sizes count
the value bytes only. Every operation is O(1) under one lock: the event loop and worker threads share one cache.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from services.common.checks import check_int
from services.common.errors import InvalidArgumentError


class CacheKey(NamedTuple):
    """Everything that determines an encoded result's bytes."""

    backbone_id: str  # the timm name and weights fingerprint, e.g. "vit_base_patch16_224@<sha256>"
    image_sha256: str  # hex sha256 of the image bytes as received
    mode: str  # gather mode name: "mist", "lst", "last", "partial", "cls"
    k: int  # MIST: the prefix length; other modes: 0
    codec: str  # a canonical name of the full codec settings (dtype, compression, level, shuffle)


@dataclass(frozen=True)
class CacheStats:
    """Counters since construction (or the last clear) and the current size."""

    hits: int  # gets that found their key
    misses: int  # gets that did not
    evictions: int  # entries dropped to make room (least recently used first)
    skipped_oversize: int  # puts not stored because the value alone exceeds max_bytes
    entries: int  # entries held now
    bytes: int  # value bytes held now
    max_bytes: int  # the bound; 0 means disabled


def image_sha256(image_bytes: bytes | bytearray | memoryview) -> str:
    """Hex sha256 of the image bytes: identical uploads share cache entries, whatever their item ids."""
    return hashlib.sha256(image_bytes).hexdigest()


def cache_key(backbone_id: str, image_digest: str, mode: str, k: int, codec: str) -> CacheKey:
    """Build a key, refusing empty or ill-typed parts (a key that silently collides would serve wrong features)."""
    for label, value in (
        ("backbone_id", backbone_id),
        ("image_digest", image_digest),
        ("mode", mode),
        ("codec", codec),
    ):
        if not isinstance(value, str) or not value:
            raise InvalidArgumentError(f"cache key part {label} must be a non-empty string; got {value!r}")
    check_int("cache key part k", k, minimum=0)
    return CacheKey(backbone_id, image_digest, mode, k, codec)


class FeatureCache:
    """Thread-safe LRU of bytes values bounded by the total value size."""

    def __init__(self, max_bytes: int) -> None:
        check_int("max_bytes", max_bytes, minimum=0)  # 0 disables the cache
        self.max_bytes = max_bytes
        self._entries: OrderedDict[CacheKey, bytes] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._skipped = 0

    @property
    def enabled(self) -> bool:
        """False when max_bytes is 0: nothing is ever stored."""
        return self.max_bytes > 0

    def get(self, key: CacheKey) -> bytes | None:
        """The value for `key` (now the most recently used), or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return value

    def put(self, key: CacheKey, value: bytes) -> bool:
        """Store `value`, evicting least recently used entries to fit; False if it is larger than the whole cache."""
        if not isinstance(value, bytes):
            raise InvalidArgumentError(f"cache values are bytes; got {type(value).__name__}")
        size = len(value)
        with self._lock:
            if size > self.max_bytes or not self.enabled:
                self._skipped += int(self.enabled)
                return False
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._bytes -= len(previous)
            while self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= len(evicted)
                self._evictions += 1
            self._entries[key] = value
            self._bytes += size
            return True

    def stats(self) -> CacheStats:
        """A consistent snapshot of the counters and size."""
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                skipped_oversize=self._skipped,
                entries=len(self._entries),
                bytes=self._bytes,
                max_bytes=self.max_bytes,
            )

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._hits = self._misses = self._evictions = self._skipped = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries
