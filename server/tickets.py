"""Stream tickets, stored in PostgreSQL so that any server process can redeem them.

A browser's EventSource cannot send an Authorization header, and a bearer token in a URL ends up
in proxy and access logs, browser history and Referer headers. A ticket is what goes in the URL
instead: 256 random bits, valid for one connection to the listed tasks, for a minute.
Redemption is one ``DELETE ... RETURNING``, so two processes racing for the same ticket cannot
both win.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from server.auth import Principal

__all__ = ["MAX_TICKET_CHARS", "Ticket", "issue", "redeem"]

# token_urlsafe(32) is 43 characters; anything much longer is not a ticket.
MAX_TICKET_CHARS = 64


@dataclass(frozen=True, slots=True)
class Ticket:
    """A redeemed ticket: who bought it and which tasks it opens."""

    principal: Principal
    task_ids: frozenset[str]


def _hash(ticket: str) -> bytes:
    return hashlib.sha256(ticket.encode("utf-8", "surrogatepass")).digest()


async def issue(
    pool: asyncpg.Pool, principal: Principal, task_ids: Sequence[str], *, ttl: int
) -> str:
    """Store a new ticket for ``principal`` and ``task_ids``; return it (it is never stored)."""
    ticket = secrets.token_urlsafe(32)
    # The sweep rides on the insert: no timer, and the index keeps it to the expired rows.
    await pool.execute(
        """
        WITH swept AS (
            DELETE FROM taskstream.stream_tickets WHERE expires_at < clock_timestamp()
        )
        INSERT INTO taskstream.stream_tickets
            (ticket_hash, user_id, task_ids, token_expires_at, scopes, expires_at)
        VALUES ($1, $2, $3::text[], $4, $5::text[],
                clock_timestamp() + make_interval(secs => $6))
        """,
        _hash(ticket),
        principal.user_id,
        list(task_ids),
        principal.expires_at,
        sorted(principal.scopes),
        float(ttl),
    )
    return ticket


async def redeem(pool: asyncpg.Pool, ticket: str) -> Ticket | None:
    """Consume a ticket. None if it is unknown, already used or expired (all look the same)."""
    if not ticket or len(ticket) > MAX_TICKET_CHARS:
        return None
    row = await pool.fetchrow(
        """
        DELETE FROM taskstream.stream_tickets
         WHERE ticket_hash = $1
        RETURNING user_id, task_ids, token_expires_at, scopes,
                  expires_at >= clock_timestamp() AS live
        """,
        _hash(ticket),
    )
    if row is None or not row["live"]:
        return None
    principal = Principal(
        user_id=row["user_id"],
        expires_at=float(row["token_expires_at"]),
        scopes=frozenset(row["scopes"]),
    )
    return Ticket(principal=principal, task_ids=frozenset(row["task_ids"]))
