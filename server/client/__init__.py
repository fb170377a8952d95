"""Clients of the taskstream server that run apart from it: the terminal client
(``taskstream watch``, ``create``, ``update``).

Nothing here imports a server module: the client speaks HTTP and SSE to the server, and the
server's own rules (validation, direct database writes) are handed in by ``server.cli`` through
:class:`~server.client.local.LocalTasks`.
"""

from __future__ import annotations

from server.client.local import DatabaseUnreachable, InvalidInput, LocalTasks, TaskRefused

__all__ = ["DatabaseUnreachable", "InvalidInput", "LocalTasks", "TaskRefused"]
