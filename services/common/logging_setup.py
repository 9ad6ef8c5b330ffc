"""Logging for every mist process: text or JSON lines on stderr, bearer tokens redacted from every line, and startup
lines held back so that the "listening on" line always comes first.

    configure_logging("info", "json")                          # root logger; a second call replaces the handler
    held = hold_logs()                                         # records wait in a buffer...
    held.release("mist-registry listening on 0.0.0.0:50052")   # ...and follow this line, in order
    log.info("tokens from %s", loggable_path(path))            # "/srv/secrets/tokens.txt" -> ".../tokens.txt"

Every formatted line goes through `redact` ("Bearer abc" -> "Bearer ***"), whoever built the message, and logs
name files, never the host's directory layout (relative paths stay as they are).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import sys
import time
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]

_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s'\",;]+")
_HANDLER_MARK = "_mist_handler"  # attribute on the handler we installed, so reconfiguring replaces it
_HOLD_CAPACITY = 10_000  # records; startup logs a few dozen at most


def redact(text: str) -> str:
    """Mask bearer tokens: a token must never reach a log file, whoever formatted the message."""
    return _BEARER.sub(r"\1***", text)


def loggable_path(path: str | os.PathLike[str]) -> str:
    """An absolute path shortened to its file name for a log line; a relative one is kept (it names no host)."""
    text = os.fspath(path)
    if not os.path.isabs(text):
        return text
    name = os.path.basename(text.rstrip("/\\"))
    return f".../{name}" if name else "..."


def _utc_timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """`2026-01-31T12:00:00.123Z INFO services.common.serving.server: message`"""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line (time, level, logger, message[, exception]) for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _utc_timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "info", fmt: LogFormat = "text", *, stream: TextIO | None = None) -> logging.Handler:
    """Send the root logger to `stream` (stderr) in `fmt`; replaces a handler an earlier call installed."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


class HeldLogs:
    """Records logged while held go to a buffer; `release` prints a first line, then them, in order."""

    def __init__(self, targets: list[logging.Handler]) -> None:
        self._root = logging.getLogger()
        self._targets = targets
        self._buffer = logging.handlers.MemoryHandler(_HOLD_CAPACITY, flushLevel=logging.CRITICAL + 1)
        for handler in targets:
            self._root.removeHandler(handler)
        self._root.addHandler(self._buffer)
        self._released = False

    def release(self, first_message: str | None = None, *, logger: str = "mist") -> None:
        """Emit `first_message` (INFO), then every held record; later records go straight out. Idempotent."""
        if self._released:
            return
        self._released = True
        self._root.removeHandler(self._buffer)
        held = list(self._buffer.buffer)
        self._buffer.close()
        if first_message is not None:
            first = logging.getLogger(logger).makeRecord(logger, logging.INFO, __file__, 0, first_message, (), None)
            held.insert(0, first)
        for record in held:
            for handler in self._targets:
                if record.levelno >= handler.level:
                    handler.handle(record)
        for handler in self._targets:
            self._root.addHandler(handler)


def hold_logs() -> HeldLogs:
    """Hold back every record the root logger's handlers would print until `release()`."""
    return HeldLogs(list(logging.getLogger().handlers))
