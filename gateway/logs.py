"""Logs an operator can ship: one format for every logger, JSON or text.

``--log-format json`` writes one JSON object per line (``time``, ``level``, ``logger``,
``message``, and for the access log every field of the request's record), ready for Loki,
Elasticsearch or CloudWatch. ``text`` writes ``time level logger message key=value ...``
for people reading a terminal, which is the default there. The access log (logger
``joulegate.access``) is one record per request; it never holds prompt text or keys.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

ACCESS_LOGGER = "joulegate.access"
FORMATS = ("json", "text")


def default_format() -> str:
    """``text`` when stderr is a terminal, else ``json``."""
    return "text" if sys.stderr.isatty() else "json"


class _Clock:
    """``time`` of a record: ISO 8601 UTC to the millisecond, the seconds part formatted
    once per second (an access record per request made ``strftime`` show in profiles)."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second, self.text = -1, ""

    def __call__(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self.second:
            self.second = second
            self.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.text}.{int(record.msecs):03d}Z"


class _Formatter(logging.Formatter):
    """What both formats share. Neither shows the caller's file and line, thread or
    process, so a process that uses them stops ``logging`` from computing those for every
    record (the optimisations the ``logging`` documentation lists)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timestamp = _Clock()
        logging._srcfile = None
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


def access(logger: logging.Logger, fields: dict[str, Any]) -> None:
    """Log one request's access record (``fields``) at INFO."""
    logger.info("request", extra={"access": fields})


class JSONFormatter(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": self._timestamp(record), "level": record.levelname,
                               "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "access", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{self._timestamp(record)} {record.levelname} {record.name} {record.getMessage()}"
        fields = getattr(record, "access", None)
        if fields:
            line += "".join(f" {k}={_text(v)}" for k, v in fields.items()
                            if v is not None and v != [])
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    text = str(value)
    return orjson.dumps(text).decode() if (" " in text or not text) else text


def log_config(level: str, fmt: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn and joulegate, all in format ``fmt``.
    Passed to uvicorn so that every worker process applies it (a worker is a fresh
    interpreter)."""
    formatter = {"()": f"{__name__}.{'JSONFormatter' if fmt == 'json' else 'TextFormatter'}"}
    handler = {"class": "logging.StreamHandler", "formatter": "default",
               "stream": "ext://sys.stderr"}
    loggers = {name: {"handlers": ["default"], "level": level.upper(), "propagate": False}
               for name in ("joulegate", "uvicorn", "uvicorn.error")}
    # uvicorn's own per-request access log duplicates joulegate's and knows no tenant.
    loggers["uvicorn.access"] = {"handlers": [], "level": "WARNING", "propagate": False}
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"default": formatter}, "handlers": {"default": handler},
            "loggers": loggers}
