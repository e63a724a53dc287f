"""The server's log: text (the default) or JSON lines (``--log-format json``), and one line per call.

Every call has a request id: the caller's ``x-request-id`` metadata when it sent a usable one (up to 128
letters, digits and ``.-_:``; anything else is replaced, never logged), else one made here (a random prefix of
the process and a counter: unique without a system call per request). The server sends it back in the trailing
metadata, errors included, so a client can quote it and an operator find the call.

The call line (logger ``loyalty.server.grpc``) has the request id, the method, the status code, the duration,
the peer and the request key the edge computes (``edge_calls.request_key``: receipt, purchase, operation or
card; never a secret). Its level: WARNING for UNAVAILABLE and INTERNAL, INFO for the other errors and, with the
access log on (the default), for OK calls; DEBUG for OK calls with ``--no-access-log``. Nothing from the
metadata is logged but the request id: an ``authorization`` header never reaches the log. The access log costs a
log record per call (benchmarks/server.py with the servers at INFO: calculate/echo 0.53 against 0.585 at
WARNING, medians of 10 interleaved rounds on a shared machine): ``--no-access-log`` where every call counts.

In text, a message is one line whatever a caller sent: control characters (line breaks, terminal escapes) are
written as escapes, so no request can forge a line. In JSON every line is one object: ``ts`` (UTC, ISO 8601),
``level``, ``logger``, ``pid``, ``message``, the call
fields (``request_id``, ``method``, ``code``, ``duration_ms``, ``peer``, ``key``, ``detail``) when the line is a
call's, and ``exception`` (the traceback) when there is one.
"""
from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
import re
import sys

import orjson

__all__ = ["REQUEST_ID", "CALL_FIELDS", "configure_logging", "request_id", "JsonFormatter", "TextFormatter",
           "CONTROL_CHARACTERS"]

REQUEST_ID = "x-request-id"
CALL_FIELDS = ("request_id", "method", "code", "duration_ms", "peer", "key", "detail")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"
_USABLE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_PREFIX = os.urandom(4).hex()
_SERIAL = itertools.count(1)


def request_id(metadata) -> str:
    """The caller's ``x-request-id`` when usable, else a new id (``<process prefix>-<counter>``)."""
    for key, value in metadata or ():
        if key == REQUEST_ID and isinstance(value, str) and _USABLE_ID.fullmatch(value):
            return value
    return f"{_PREFIX}-{next(_SERIAL):x}"


# What a caller's text (a receipt number, a card, an error quoting either) must not bring into a text log line:
# line breaks that would start a forged line, terminal escapes, other control characters. (Names that become
# the log's actors, API keys', refuse them: ``security.keys``.)
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(match: re.Match) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


class TextFormatter(logging.Formatter):
    """The text line, its message on one line whatever the caller sent: control characters written as escapes
    (``\\n``, ``\\x1b``); a traceback after it keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        if CONTROL_CHARACTERS.search(record.message):
            record.message = CONTROL_CHARACTERS.sub(_escaped, record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module's docstring for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for field in CALL_FIELDS:
            value = record.__dict__.get(field)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """The root logger to stderr at ``level``, as text or JSON lines (replacing any earlier setup)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
