"""limit_malloc_arenas: one glibc arena for a serving process and the workers it spawns; an operator's
MALLOC_ARENA_MAX is left alone. Each case runs in a fresh interpreter: the setting is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from services.common.serving import allocator

_SCRIPT = """
import json, os, subprocess, sys
from services.common.serving.allocator import limit_malloc_arenas
applied = limit_malloc_arenas()
child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('MALLOC_ARENA_MAX', ''))"],
                       capture_output=True, text=True, check=True).stdout.strip()
print(json.dumps({"applied": applied, "own": os.environ.get("MALLOC_ARENA_MAX", ""), "child": child}))
"""


def run_script(**env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if k != allocator.ENV_VAR}
    environment.update(env)
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=environment, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc only: elsewhere limit_malloc_arenas does nothing")
def test_the_limit_applies_here_and_in_spawned_processes() -> None:
    assert run_script() == {"applied": True, "own": "1", "child": "1"}


def test_an_operators_setting_is_kept() -> None:
    assert run_script(MALLOC_ARENA_MAX="4") == {"applied": False, "own": "4", "child": "4"}


def test_without_glibc_nothing_changes(monkeypatch) -> None:
    monkeypatch.delenv(allocator.ENV_VAR, raising=False)
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.limit_malloc_arenas() is False
    assert allocator.ENV_VAR not in os.environ
