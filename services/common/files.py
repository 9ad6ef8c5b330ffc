"""Files written whole or not at all: a temporary file beside the target, flushed to disk, renamed over it.

    with atomic_file(path) as file:      # binary; a crash or an exception leaves the old file (or none), never half
        file.write(header); file.write(records)
    write_atomically(path, text)         # str is written as UTF-8

Devices lose power mid-write and runs get killed; the rename is atomic on POSIX file systems, and the fsync before it
keeps a power cut from renaming an empty file into place.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` when the block ends normally; removed when it raises."""
    target = Path(path)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_atomically(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` whole or not at all."""
    with atomic_file(path) as file:
        file.write(data.encode("utf-8") if isinstance(data, str) else data)
