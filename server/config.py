"""Settings, read once from the environment.

Every setting is an environment variable so that the same values work for the CLI, for each
Hypercorn worker process (which inherits the environment) and for docker-compose.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import platformdirs

from server.cors import parse_origins

__all__ = ["ConfigError", "Settings"]

_N = TypeVar("_N", int, float)


class ConfigError(ValueError):
    """A setting has a value that taskstream cannot run with."""


def _number(
    env: dict[str, str], name: str, default: _N, minimum: _N, parse: Callable[[str], _N], kind: str
) -> _N:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {kind}, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(env: dict[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    return _number(env, name, default, minimum, float, "a number of seconds")


def _int(env: dict[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    return _number(env, name, default, minimum, int, "a whole number")


# See server/gctuning.py for why the server does not run with the interpreter's (700, 10, 10).
DEFAULT_GC_THRESHOLDS = (50_000, 20, 10)


def _gc_thresholds(env: dict[str, str], name: str) -> tuple[int, int, int] | None:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return DEFAULT_GC_THRESHOLDS
    if raw == "python":
        return None  # leave the interpreter's own thresholds alone
    parts = [p.strip() for p in raw.split(",")]
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() and 0 < len(p) <= 9 for p in parts):
        raise ConfigError(
            f"{name} must be three whole numbers like 50000,20,10 (or 'python'), got {raw!r}"
        )
    g0, g1, g2 = (int(p) for p in parts)
    if g0 < 1:
        raise ConfigError(f"{name}: the first threshold must be at least 1 (0 disables the GC)")
    return (g0, g1, g2)


def _bool(env: dict[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _origins(env: dict[str, str], name: str) -> tuple[str, ...]:
    try:
        return parse_origins(env.get(name, ""))
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _list(env: dict[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated setting, blanks dropped."""
    return tuple(part.strip() for part in env.get(name, "").split(",") if part.strip())


def _nats_urls(env: dict[str, str], name: str) -> tuple[str, ...]:
    """``TASKSTREAM_NATS_URL``: one or more comma-separated ``nats://`` (or ``tls://``) URLs."""
    urls = _list(env, name)
    for url in urls:
        scheme, sep, rest = url.partition("://")
        host = rest.rsplit("@", 1)[-1].split("/", 1)[0]
        if scheme not in ("nats", "tls") or not sep or not host or any(c.isspace() for c in url):
            shown = f"{scheme}://..." if sep else url[:40]
            raise ConfigError(
                f"{name} must be comma-separated nats:// or tls:// URLs "
                f"(like nats://nats-1:4222,nats://nats-2:4222), got {shown!r}"
            )
    return urls


def _subject_prefix(env: dict[str, str], name: str) -> str:
    raw = env.get(name, "").strip() or "taskstream"
    if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", raw) or len(raw) > 100:
        raise ConfigError(
            f"{name} must be dot-separated tokens of letters, digits, '_' and '-' "
            f"(at most 100 characters), got {raw[:40]!r}"
        )
    return raw


def _metrics_token(env: dict[str, str], name: str) -> str | None:
    raw = env.get(name, "")
    if raw == "":
        return None
    # It is compared with what scrapers send in a header: only visible ASCII can travel there.
    if len(raw) < 16 or not all("!" <= c <= "~" for c in raw):
        raise ConfigError(
            f"{name} must be at least 16 visible ASCII characters (no spaces); generate one "
            "with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return raw


def default_data_dir() -> Path:
    """Per-user data directory for the embedded PostgreSQL and the generated secret."""
    return Path(platformdirs.user_data_dir("taskstream", appauthor=False))


@dataclass(frozen=True)
class Settings:
    """Runtime settings. Build with :meth:`from_env`; tests override fields with ``replace``."""

    database_url: str | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    jwt_secret: str | None = None
    stream_timeout: float = 600.0
    heartbeat: float = 15.0
    retry_ms: int = 3000
    fallback_poll: float = 2.0
    send_timeout: float = 30.0
    shutdown_grace: float = 5.0
    max_streams: int = 10_000
    max_streams_per_user: int = 100
    listener_check_interval: float = 5.0
    error_max_chars: int = 1000
    log_level: str = "INFO"
    cors_origins: tuple[str, ...] = ()
    metrics_sample_interval: float = 10.0
    # Reverse proxies in front of the server whose X-Forwarded-For/-Proto/-Host are believed;
    # 0 believes none (a client could otherwise claim any address).
    trusted_proxy_hops: int = 0
    # Demo mode (`taskstream serve --demo`): a token endpoint for a fixed user and a simulated
    # worker. For a local try-out only, never for production.
    demo: bool = False
    demo_speed: float = 1.0
    # Authentication (see README "Security").
    jwt_public_key: Path | None = None
    jwks_url: str | None = None
    jwt_algorithms: tuple[str, ...] | None = None
    jwt_issuer: str | None = None
    jwt_audience: tuple[str, ...] = ()
    jwt_leeway: int = 30
    jwt_user_claim: str = "sub"
    jwt_cookie: str | None = None
    allow_query_token: bool = True
    ticket_ttl: int = 60
    # Tickets one user may buy per minute from one process (a burst of as many, then 1 per
    # 60/N seconds); 429 with Retry-After past it.
    ticket_rate: int = 60
    ticket_sweep_interval: float = 60.0
    # A bearer token /metrics requires; None leaves /metrics open (keep it off the internet).
    metrics_token: str | None = None
    # gc.set_threshold() for each server process; None keeps the interpreter's.
    gc_thresholds: tuple[int, int, int] | None = DEFAULT_GC_THRESHOLDS
    # Group commit of the task API's writes (server/writebatch.py, docs/operations.md): on, at
    # most write_batch_max writes per transaction, and under load write_batch_window seconds
    # more to gather before a flush (0: the next flush starts as soon as the last one ends).
    write_batch: bool = True
    write_batch_window: float = 0.0
    write_batch_max: int = 500
    # PATCH /api/v1/tasks: most task updates one request may carry.
    bulk_max_items: int = 1000
    # The NATS fan-out bus (docs/scaling.md): empty keeps one LISTEN connection per process.
    nats_urls: tuple[str, ...] = ()
    # Subjects live under it; one prefix per fleet and database (fleets may share a NATS).
    nats_subject_prefix: str = "taskstream"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = dict(os.environ if env is None else env)
        heartbeat = _float(e, "TASKSTREAM_HEARTBEAT", 15.0, minimum=0.05)
        if heartbeat >= 45:
            # event-source-polyfill drops a connection that is silent for 45 s (its default
            # heartbeatTimeout), so a slower heartbeat makes that client reconnect forever.
            raise ConfigError(
                f"TASKSTREAM_HEARTBEAT must be below 45 seconds (got {heartbeat:g}): "
                "event-source-polyfill closes a stream that is silent for 45 s"
            )
        data_dir = e.get("TASKSTREAM_DATA_DIR", "")
        return cls(
            database_url=e.get("DATABASE_URL") or None,
            data_dir=Path(data_dir).expanduser() if data_dir else default_data_dir(),
            jwt_secret=e.get("TASKSTREAM_JWT_SECRET") or None,
            stream_timeout=_float(e, "TASKSTREAM_STREAM_TIMEOUT", 600.0, minimum=0.05),
            heartbeat=heartbeat,
            retry_ms=_int(e, "TASKSTREAM_RETRY_MS", 3000, minimum=0),
            fallback_poll=_float(e, "TASKSTREAM_FALLBACK_POLL", 2.0, minimum=0.05),
            send_timeout=_float(e, "TASKSTREAM_SEND_TIMEOUT", 30.0, minimum=0.05),
            shutdown_grace=_float(e, "TASKSTREAM_SHUTDOWN_GRACE", 5.0, minimum=0.0),
            max_streams=_int(e, "TASKSTREAM_MAX_STREAMS", 10_000, minimum=1),
            max_streams_per_user=_int(e, "TASKSTREAM_MAX_STREAMS_PER_USER", 100, minimum=1),
            listener_check_interval=_float(e, "TASKSTREAM_LISTENER_CHECK", 5.0, minimum=0.05),
            log_level=(e.get("TASKSTREAM_LOG_LEVEL") or "INFO").upper(),
            cors_origins=_origins(e, "TASKSTREAM_CORS_ORIGINS"),
            metrics_sample_interval=_float(e, "TASKSTREAM_METRICS_SAMPLE", 10.0, minimum=0.05),
            trusted_proxy_hops=_int(e, "TASKSTREAM_TRUSTED_PROXY_HOPS", 0, minimum=0),
            demo=_bool(e, "TASKSTREAM_DEMO", False),
            demo_speed=_float(e, "TASKSTREAM_DEMO_SPEED", 1.0, minimum=0.01),
            jwt_public_key=Path(e["TASKSTREAM_JWT_PUBLIC_KEY"]).expanduser()
            if e.get("TASKSTREAM_JWT_PUBLIC_KEY")
            else None,
            jwks_url=e.get("TASKSTREAM_JWKS_URL") or None,
            jwt_algorithms=_list(e, "TASKSTREAM_JWT_ALGORITHMS") or None,
            jwt_issuer=e.get("TASKSTREAM_JWT_ISSUER") or None,
            jwt_audience=_list(e, "TASKSTREAM_JWT_AUDIENCE"),
            jwt_leeway=_int(e, "TASKSTREAM_JWT_LEEWAY", 30, minimum=0),
            jwt_user_claim=e.get("TASKSTREAM_JWT_USER_CLAIM") or "sub",
            jwt_cookie=e.get("TASKSTREAM_JWT_COOKIE") or None,
            allow_query_token=_bool(e, "TASKSTREAM_ALLOW_QUERY_TOKEN", True),
            ticket_ttl=_int(e, "TASKSTREAM_TICKET_TTL", 60, minimum=1),
            ticket_rate=_int(e, "TASKSTREAM_TICKET_RATE", 60, minimum=1),
            ticket_sweep_interval=_float(e, "TASKSTREAM_TICKET_SWEEP", 60.0, minimum=0.05),
            metrics_token=_metrics_token(e, "TASKSTREAM_METRICS_TOKEN"),
            gc_thresholds=_gc_thresholds(e, "TASKSTREAM_GC_THRESHOLDS"),
            write_batch=_bool(e, "TASKSTREAM_WRITE_BATCH", True),
            write_batch_window=_float(e, "TASKSTREAM_WRITE_BATCH_WINDOW", 0.0, minimum=0.0),
            write_batch_max=_int(e, "TASKSTREAM_WRITE_BATCH_MAX", 500, minimum=1),
            bulk_max_items=_int(e, "TASKSTREAM_BULK_MAX_ITEMS", 1000, minimum=1),
            nats_urls=_nats_urls(e, "TASKSTREAM_NATS_URL"),
            nats_subject_prefix=_subject_prefix(e, "TASKSTREAM_NATS_SUBJECT_PREFIX"),
        )
