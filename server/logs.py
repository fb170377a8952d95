"""Structured logging: one JSON object per line on stdout, and an access log without secrets.

Log collectors (Docker, journald, Loki, CloudWatch) parse one JSON line per record, so every record
is a flat object: ``ts``, ``level``, ``logger``, ``msg`` and whatever ``extra={...}`` fields the
caller attached (``event``, ``reason``, ``duration_s``...).

Tokens never reach a log line. The access log is built from the ASGI scope's *path* only, never
the query string (where EventSource clients put ``access_token``) nor any header (where
``Authorization`` lives). As a second line of defence the formatter masks anything that still
looks like a bearer token or an ``access_token=`` parameter, whoever logged it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from hypercorn.logging import Logger as HypercornLogger

__all__ = ["AccessLogger", "JsonFormatter", "forwarded_client", "redact", "setup_logging"]

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is emitted.
_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}

_SECRETS = re.compile(r"(?i)(access_token=|bearer\s+)[^\s&\"',;\\]+")
# A bare JWT (three base64url parts, the first one a JSON header) anywhere else.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+")


def redact(text: str) -> str:
    """Mask the value of ``access_token=...`` and ``Bearer ...`` wherever they appear."""
    return _JWT.sub("[redacted]", _SECRETS.sub(r"\1[redacted]", text))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, secrets masked."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, default=str, ensure_ascii=False))


def setup_logging(level: str) -> None:
    """Send every logger's records to stdout as JSON lines, at ``level`` (TASKSTREAM_LOG_LEVEL)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # Hypercorn configures its own loggers; route them through ours.
    for name in ("hypercorn.error", "hypercorn.access"):
        hlog = logging.getLogger(name)
        hlog.handlers.clear()
        hlog.propagate = True


access_logger = logging.getLogger("taskstream.access")

# An address is short; a longer X-Forwarded-For entry is junk and is not worth a log line.
MAX_CLIENT_CHARS = 100


def forwarded_client(headers: Iterable[tuple[bytes, bytes]], trusted_hops: int) -> str | None:
    """The client address that ``trusted_hops`` proxies report in X-Forwarded-For, else None.

    The same rule as Hypercorn's ``ProxyFixMiddleware`` in legacy mode (which the app runs when
    TASKSTREAM_TRUSTED_PROXY_HOPS is set): each proxy appends the address it saw, so the entry
    ``trusted_hops`` from the right is the last one a trusted proxy wrote; entries further left
    came from the client and prove nothing.
    """
    if trusted_hops <= 0:
        return None
    values: list[str] = []
    for name, value in headers:
        if name.lower() == b"x-forwarded-for":
            values.extend(v.decode("latin1").strip() for v in value.split(b","))
    if len(values) < trusted_hops:
        return None
    return values[-trusted_hops][:MAX_CLIENT_CHARS]


class AccessLogger(HypercornLogger):
    """Hypercorn's logger with a structured access log that cannot contain a token.

    Set as ``Config.logger_class``. The stock access log formats ``%(r)s`` (the request line,
    query string included) and can be told to print any header, so it is replaced, not filtered.
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        from server.config import Settings

        self.trusted_proxy_hops = Settings.from_env().trusted_proxy_hops

    async def access(self, request: Any, response: Any, request_time: float) -> None:
        if not access_logger.isEnabledFor(logging.INFO):
            return
        # Hypercorn logs the scope it built, not the app's proxy-fixed copy: apply the rule here.
        forwarded = forwarded_client(request.get("headers", ()), self.trusted_proxy_hops)
        client = (forwarded, 0) if forwarded is not None else request.get("client")
        access_logger.info(
            "access",
            extra={
                "event": "access",
                "method": request.get("method", ""),
                # The path only: the query string may carry access_token.
                "path": request.get("path", ""),
                "status": None if response is None else response.get("status"),
                "http_version": request.get("http_version", ""),
                "duration_s": round(request_time, 4),
                "client": client[0] if client else None,
            },
        )
