"""The allocator setting `mist` and `mist-tuner` apply at start."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from services.tuner.memory import limit_heap_growth


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's mmap threshold is a glibc setting")
def test_threshold_is_applied_on_glibc(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert ctypes.util.find_library("c")
    assert limit_heap_growth() is True


def test_an_operator_choice_in_the_environment_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert limit_heap_growth() is False
