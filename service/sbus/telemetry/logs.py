"""The server's log: uvicorn's and the bus's messages at ``SBUS_LOG_LEVEL``, one line per
request from the ``sbus.request`` logger (:mod:`sbus.telemetry.requests`), all in the
format ``SBUS_LOG_FORMAT`` names (docs/observability.md).

- ``json``: every record is one JSON object on one line: ``ts`` (RFC 3339 UTC,
  milliseconds), ``level``, ``logger``, ``msg``, then a request line's fields.
- ``text``: uvicorn's own lines (``INFO:     ...``); a request line reads
  ``INFO:     POST /commit 200 committed 1.234 ms agent=A session=S request_id=...``.

A request line is the one log line every request pays for, so ``sbus serve`` gives the
``sbus.request`` logger a :class:`RequestLineHandler`, which the middleware hands the
line's fields directly (:func:`direct_handler`): the same line as a log record would
give, without making one (a record, the caller lookup and the handler chain cost about
three times the write itself). Any other logging setup (an embedding application's, the
test suite's) gets an ordinary record.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Literal

import orjson

LogFormat = Literal["json", "text"]
REQUEST_LOGGER = "sbus.request"
# The attribute of a request line's record holding its fields (``extra={FIELDS: ...}``).
FIELDS = "sbus"


def _timestamp(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int((created - int(created)) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, built in one dict and encoded once."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, FIELDS, None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()

    @staticmethod
    def request_line(fields: dict[str, Any], created: float) -> str:
        """What :meth:`format` makes of a request line's record."""
        line = {"ts": _timestamp(created), "level": "info", "logger": REQUEST_LOGGER}
        line["msg"] = "request"
        line.update(fields)
        return orjson.dumps(line, default=str).decode()


def request_text(fields: dict[str, Any]) -> str:
    """A request line's fields as text: the request, then the named fields."""
    head = (
        f"{fields['method']} {fields['route']} {fields['status']} {fields['outcome']} "
        f"{fields['duration_ms']:.3f} ms"
    )
    named = " ".join(
        f"{name}={fields[name]}"
        for name in ("agent", "session", "request_id", "trace_id")
        if fields.get(name) is not None
    )
    return f"{head} {named}"


class TextFormatter(logging.Formatter):
    """uvicorn's text layout (``LEVEL:`` padded to ten columns), request lines as
    :func:`request_text`."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, FIELDS, None)
        message = request_text(fields) if fields else record.getMessage()
        prefix = f"{record.levelname}:".ljust(9)
        text = f"{prefix} {message}"
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return text

    @staticmethod
    def request_line(fields: dict[str, Any], created: float) -> str:
        """What :meth:`format` makes of a request line's record."""
        return f"INFO:     {request_text(fields)}"


class RequestLineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The ``sbus.request`` handler of ``sbus serve``: writes request lines handed to
    :meth:`write_fields` as its formatter would format their records."""

    def write_fields(self, fields: dict[str, Any]) -> None:
        formatter = self.formatter
        if not isinstance(formatter, JsonFormatter | TextFormatter):
            self.handle(_record(fields))
            return
        line = formatter.request_line(fields, time.time()) + self.terminator
        self.acquire()
        try:
            self.stream.write(line)
            self.flush()
        except Exception:  # noqa: BLE001 - logging's rule: a failed write never fails the request
            self.handleError(_record(fields))
        finally:
            self.release()


def _record(fields: dict[str, Any]) -> logging.LogRecord:
    record = logging.makeLogRecord(
        {"name": REQUEST_LOGGER, "levelno": logging.INFO, "levelname": "INFO", "msg": "request"}
    )
    setattr(record, FIELDS, fields)
    return record


def direct_handler(logger: logging.Logger) -> RequestLineHandler | None:
    """``logger``'s :class:`RequestLineHandler` when it is all that handles its INFO
    records (no filter, no propagation, no other handler), else None."""
    handlers = logger.handlers
    if len(handlers) != 1 or logger.propagate or logger.filters:
        return None
    handler = handlers[0]
    if type(handler) is not RequestLineHandler or handler.filters:
        return None
    return handler if handler.level <= logging.INFO else None


def log_config(level: str, fmt: LogFormat, access_log: bool) -> dict[str, Any]:
    """uvicorn's logging configuration plus the ``sbus`` loggers, all at ``level``;
    access lines (stdout) whenever they are on, whatever the level. ``json`` puts every
    handler on :class:`JsonFormatter`; ``text`` keeps uvicorn's formatters and gives
    request lines :class:`TextFormatter`. Request lines go to stderr through a
    :class:`RequestLineHandler`."""
    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    loggers = config["loggers"]
    loggers["uvicorn"]["level"] = loggers["uvicorn.error"]["level"] = level.upper()
    loggers["uvicorn.access"]["level"] = "INFO" if access_log else "WARNING"
    loggers["sbus"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    formatters = config["formatters"]
    handlers = config["handlers"]
    if fmt == "json":
        for name in list(formatters):
            formatters[name] = {"()": JsonFormatter}
    formatters["sbus_request"] = {"()": JsonFormatter if fmt == "json" else TextFormatter}
    handlers["sbus_request"] = {
        **handlers["default"],
        "class": f"{__name__}.RequestLineHandler",
        "formatter": "sbus_request",
    }
    loggers[REQUEST_LOGGER] = {
        "handlers": ["sbus_request"],
        "level": level.upper(),
        "propagate": False,
    }
    return config
