"""Structured (JSON lines) logging with secrets masked.

One line per event, with fields passed as ``extra=``, so logs can be grepped and shipped as they are.
Masking happens in the formatter so no call site can leak a token or password by accident.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_SECRET_KEY = re.compile(r"token|password|passwd|secret|api_key|authorization", re.IGNORECASE)
# A token that slipped into a message: "Token abc", "Bearer abc", "Basic abc".
_SECRET_VALUE = re.compile(r"\b(Token|Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+")


def _mask(key: str, value: Any) -> Any:
    if _SECRET_KEY.search(key):
        return "***"
    if isinstance(value, str):
        return _SECRET_VALUE.sub(r"\1 ***", value)
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": _mask("event", record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = _mask(key, value)
        if record.exc_info:
            out["exc"] = _mask("exc", self.formatException(record.exc_info))
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO", stream=None) -> None:
    """Route every logger (ours, waitress, rq) through one JSON handler on stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # ultralytics logs every prediction at INFO through its own handler; keep it to warnings.
    logging.getLogger("ultralytics").setLevel(logging.WARNING)
