"""FeatureCache: LRU order, the byte bound, oversize values, counters, key validation and a thread-safety smoke."""

from __future__ import annotations

import hashlib
import threading

import pytest

from services.common.errors import InvalidArgumentError
from services.extractor.cache import CacheKey, CacheStats, FeatureCache, cache_key, image_sha256

BACKBONE = "vit_tiny_patch16_224@random-0-0123456789abcdef"


def key(n: int, k: int = 3, codec: str = "i8+zstd3+shuffle") -> CacheKey:
    return cache_key(BACKBONE, f"{n:064x}", "mist", k, codec)


def test_image_sha256_is_the_hex_digest_of_the_bytes() -> None:
    assert image_sha256(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert image_sha256(memoryview(b"abc")) == image_sha256(bytearray(b"abc"))


def test_keys_differ_in_every_part() -> None:
    # Prepare
    base = dict(backbone_id=BACKBONE, image_digest="a" * 64, mode="mist", k=3, codec="f16+zstd3")
    variants = [
        {"backbone_id": "vit_tiny_patch16_224@" + "f" * 64},
        {"image_digest": "b" * 64},
        {"mode": "lst", "k": 0},
        {"k": 4},
        {"codec": "i8+zstd3"},
    ]

    # Execute
    keys = {cache_key(**base)} | {cache_key(**{**base, **change}) for change in variants}

    # Assert
    assert len(keys) == 1 + len(variants)
    assert cache_key(**base) == CacheKey(BACKBONE, "a" * 64, "mist", 3, "f16+zstd3")


@pytest.mark.parametrize(
    "change",
    [
        {"backbone_id": ""},
        {"image_digest": b"\x00" * 32},
        {"mode": None},
        {"k": -1},
        {"k": True},
        {"k": 2.0},
        {"codec": ""},
    ],
)
def test_cache_key_rejects_bad_parts(change: dict) -> None:
    base = dict(backbone_id=BACKBONE, image_digest="a" * 64, mode="mist", k=3, codec="f16")
    with pytest.raises(InvalidArgumentError):
        cache_key(**{**base, **change})


def test_get_returns_what_put_stored_and_counts_hits_and_misses() -> None:
    # Prepare
    cache = FeatureCache(max_bytes=1000)

    # Execute
    stored = cache.put(key(1), b"x" * 100)
    hit = cache.get(key(1))
    miss = cache.get(key(2))

    # Assert
    assert stored is True
    assert hit == b"x" * 100
    assert miss is None
    assert cache.stats() == CacheStats(
        hits=1, misses=1, evictions=0, skipped_oversize=0, entries=1, bytes=100, max_bytes=1000
    )


def test_least_recently_used_entry_is_evicted_first() -> None:
    # Prepare: three 100-byte entries fill 300 bytes; reading 1 makes 2 the least recently used.
    cache = FeatureCache(max_bytes=300)
    for n in (1, 2, 3):
        cache.put(key(n), bytes([n]) * 100)
    cache.get(key(1))

    # Execute
    cache.put(key(4), b"\x04" * 100)

    # Assert
    assert key(2) not in cache
    assert [n for n in (1, 3, 4) if key(n) in cache] == [1, 3, 4]
    assert cache.stats().evictions == 1
    assert cache.stats().bytes == 300


def test_bytes_bound_evicts_as_many_entries_as_needed() -> None:
    # Prepare
    cache = FeatureCache(max_bytes=1000)
    for n in range(10):
        cache.put(key(n), b"s" * 100)

    # Execute: one 550-byte value needs six 100-byte entries to go.
    cache.put(key(99), b"L" * 550)

    # Assert
    stats = cache.stats()
    assert stats.evictions == 6
    assert stats.entries == 5
    assert stats.bytes == 950
    assert [n for n in range(10) if key(n) in cache] == [6, 7, 8, 9]


def test_value_larger_than_the_cache_is_not_stored_and_evicts_nothing() -> None:
    # Prepare
    cache = FeatureCache(max_bytes=500)
    cache.put(key(1), b"a" * 400)

    # Execute
    stored = cache.put(key(2), b"b" * 501)

    # Assert
    assert stored is False
    assert key(2) not in cache and key(1) in cache
    assert cache.stats().skipped_oversize == 1
    assert cache.stats().evictions == 0
    assert cache.stats().bytes == 400


def test_value_exactly_the_cache_size_fits() -> None:
    cache = FeatureCache(max_bytes=500)
    assert cache.put(key(1), b"a" * 500) is True
    assert cache.stats().bytes == 500


def test_replacing_a_key_updates_its_size() -> None:
    # Prepare
    cache = FeatureCache(max_bytes=1000)
    cache.put(key(1), b"a" * 300)

    # Execute
    cache.put(key(1), b"b" * 50)

    # Assert
    assert cache.get(key(1)) == b"b" * 50
    assert cache.stats().bytes == 50
    assert cache.stats().entries == 1


def test_zero_max_bytes_disables_the_cache() -> None:
    # Prepare
    cache = FeatureCache(max_bytes=0)

    # Execute
    stored = cache.put(key(1), b"a")
    value = cache.get(key(1))

    # Assert
    assert cache.enabled is False
    assert stored is False
    assert value is None
    assert cache.stats() == CacheStats(
        hits=0, misses=1, evictions=0, skipped_oversize=0, entries=0, bytes=0, max_bytes=0
    )


@pytest.mark.parametrize("max_bytes", [-1, 1.5, "10", True])
def test_bad_max_bytes_is_refused(max_bytes: object) -> None:
    with pytest.raises(InvalidArgumentError):
        FeatureCache(max_bytes=max_bytes)  # type: ignore[arg-type]


def test_values_must_be_bytes() -> None:
    cache = FeatureCache(max_bytes=100)
    with pytest.raises(InvalidArgumentError):
        cache.put(key(1), bytearray(b"abc"))  # type: ignore[arg-type]


def test_clear_drops_entries_and_counters() -> None:
    cache = FeatureCache(max_bytes=100)
    cache.put(key(1), b"abc")
    cache.get(key(1))
    cache.clear()
    assert len(cache) == 0
    assert cache.stats() == CacheStats(
        hits=0, misses=0, evictions=0, skipped_oversize=0, entries=0, bytes=0, max_bytes=100
    )


def test_concurrent_threads_keep_the_byte_accounting_exact() -> None:
    # Prepare: 8 threads each put and get 300 distinct 10..109-byte values into a cache that holds about 40 of them.
    cache = FeatureCache(max_bytes=2500)
    errors: list[BaseException] = []

    def worker(thread_id: int) -> None:
        try:
            for n in range(300):
                k = key(thread_id * 1000 + n)
                cache.put(k, b"v" * (10 + n % 100))
                value = cache.get(k)
                assert value is None or value == b"v" * (10 + n % 100)
        except BaseException as error:  # surfaced in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]

    # Execute
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Assert: the counted bytes equal the stored bytes, within the bound, and every operation was counted.
    stats = cache.stats()
    held = [(t, n) for t in range(8) for n in range(300) if key(t * 1000 + n) in cache]
    assert errors == []
    assert stats.entries == len(held) > 0
    assert stats.bytes == sum(10 + n % 100 for _, n in held) <= 2500
    assert stats.hits + stats.misses == 8 * 300
    assert stats.evictions == 8 * 300 - stats.entries
