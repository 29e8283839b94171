"""How a broker or worker writes its log: a line of text for a person at a
terminal, or one JSON object per line for a log collector.

Events worth collecting (a worker joined, left or was presumed lost; a job
re-queued and why; a child that died, or was killed at its timeout or for
its memory) are logged with an ``extra={"event": ..., ...}``: in JSON those
fields are keys of the line, next to ``time``, ``level``, ``logger`` and
``message``. The list of events: docs/observability.md.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

#: What every log record has: anything else was passed as ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update((key, value) for key, value in vars(record).items() if key not in _STANDARD)
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str | None = None, format: str = "text") -> None:
    """Log to stderr at ``level`` (default: ``$MPQUEUE_LOG_LEVEL``, else INFO)
    in ``format``, replacing whatever was set up before."""
    level = (level or os.environ.get("MPQUEUE_LOG_LEVEL") or "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):
        level = "INFO"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else logging.Formatter("%(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
