"""What ``taskstream create`` and ``update`` need from the server side, as an interface.

The terminal client validates input with the server's own rules before it sends anything, and,
with no URL or token, writes the database directly. Both are the server's: ``server.localtasks``
implements this interface, and ``server.cli`` hands it to the client, so the client package never
imports the API's modules.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["DatabaseUnreachable", "InvalidInput", "LocalTasks", "TaskRefused"]


class InvalidInput(ValueError):
    """The fields break the API's validation rules; the message lists each problem."""


class TaskRefused(Exception):
    """The task forbids the write: the id exists, there is no such task, or it is finished."""


class DatabaseUnreachable(ConnectionError):
    """PostgreSQL (DATABASE_URL, or the embedded one) cannot be reached."""


class LocalTasks(Protocol):
    """The server's task rules and direct database writes, as the terminal client uses them."""

    def check_create(self, fields: dict[str, Any]) -> None:
        """Raise :class:`InvalidInput` unless ``fields`` are a valid ``POST /api/v1/tasks`` body."""

    def check_update(self, fields: dict[str, Any]) -> None:
        """Raise :class:`InvalidInput` unless ``fields`` are a valid ``PATCH`` body."""

    async def create(self, fields: dict[str, Any]) -> str:
        """Insert the task into the database and return its id."""

    async def update(self, task_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Apply the change in the database and return the task as the API shows it."""
