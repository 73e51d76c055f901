"""Logging set-up: every line carries the node id; text for people, JSON for machines.

Events that other tools rely on (leader changes, membership changes) are logged once at
INFO with ``extra={"event": ...}``; the JSON format puts those extra fields at top level.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

LINES_BUFFERED_MAX = 512     # a turn that logs more writes them in chunks of this many
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class _NodeFilter(logging.Filter):
    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node_id
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "node": getattr(record, "node", ""),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in doc and key != "node":
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(node)s %(name)s: %(message)s")
        self._second = (-1, "")          # the last whole second formatted, and its text

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second[0]:
            self._second = (second, time.strftime("%H:%M:%S", time.localtime(second)))
        return f"{self._second[1]}.{int(record.msecs):03d}"


class TurnHandler(logging.StreamHandler):
    """A stream handler that writes what the event loop's thread logs in one turn of the
    loop as one write, at the end of the turn (a busy node logs a few lines per task: a
    write each cost more than formatting them).  WARNING and above, lines from other
    threads and lines logged with no loop running are written at once, after what waits."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._due = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        if record.levelno < logging.WARNING and len(self._lines) < LINES_BUFFERED_MAX:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                if not self._due:
                    self._due = True
                    loop.call_soon(self.flush)
                return
        self.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            self._due = False
            if self._lines:
                text, self._lines = "".join(self._lines), []
                try:
                    self.stream.write(text)
                except Exception:        # as StreamHandler: a closed stderr must not kill the node
                    return
            super().flush()
        finally:
            self.release()


def setup(node_id: str, log_format: str = "text", level: str = "info") -> None:
    # What no line shows is not collected (the logging HOWTO's "Optimization"): the caller's
    # file and line (a walk up the stack per record), thread, process and multiprocessing
    # names.  A busy node logs a line or two per task.
    logging._srcfile = None             # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = TurnHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_NodeFilter(node_id))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Library chatter is not the operator's business at INFO.
    for noisy in ("aiohttp.access", "zeroconf", "pysyncobj"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
