"""Structured logs mask secrets whatever the call site passes."""

from __future__ import annotations

import io
import json
import logging

from annoloop.logs import configure_logging


def test_json_lines_with_fields_and_masked_secrets():
    stream = io.StringIO()
    configure_logging("INFO", stream)
    log = logging.getLogger("annoloop.test")
    log.info(
        "fetch with Token abcdef123456 failed",
        extra={"api_key": "abcdef123456", "project": "3", "authorization": "Bearer xyz.abc"},
    )
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["event"] == "fetch with Token *** failed"
    assert line["api_key"] == "***" and line["authorization"] == "***"
    assert line["project"] == "3" and line["level"] == "info" and line["logger"] == "annoloop.test"
    assert "abcdef123456" not in stream.getvalue()
