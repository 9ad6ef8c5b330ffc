"""services/common/files.py: a file is replaced whole, or left as it was when the writer fails."""

from __future__ import annotations

import pytest

from services.common.files import atomic_file, write_atomically


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    write_atomically(target, "old")
    write_atomically(target, "néw")
    assert target.read_text(encoding="utf-8") == "néw" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "features.feat"
    write_atomically(target, b"whole")
    with pytest.raises(RuntimeError), atomic_file(target) as file:
        file.write(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"whole" and sorted(p.name for p in tmp_path.iterdir()) == ["features.feat"]
