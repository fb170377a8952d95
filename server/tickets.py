"""Stream tickets, stored in PostgreSQL so that any server process can redeem them.

A browser's EventSource cannot send an Authorization header, and a bearer token in a URL ends up
in proxy and access logs, browser history and Referer headers. A ticket is what goes in the URL
instead: 256 random bits, valid for one connection to the listed tasks, for a minute.
Redemption is one ``DELETE ... RETURNING``, so two processes racing for the same ticket cannot
both win.

Expired tickets are swept when a ticket is bought, when one is redeemed, and every
``TASKSTREAM_TICKET_SWEEP`` seconds by each process (:func:`run_sweeper`), so the table holds
at most the tickets of the last ticket lifetime, which the per-user rate limit bounds.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from server import db
from server.auth import Principal

__all__ = ["MAX_TICKET_CHARS", "Ticket", "issue", "redeem", "run_sweeper", "sweep"]

logger = logging.getLogger(__name__)

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
    # The sweep leaves this ticket to the main DELETE, which must report whether it was live.
    row = await pool.fetchrow(
        """
        WITH swept AS (
            DELETE FROM taskstream.stream_tickets
             WHERE expires_at < clock_timestamp() AND ticket_hash <> $1
        )
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


async def sweep(pool: asyncpg.Pool) -> int:
    """Delete expired tickets; return how many."""
    status: str = await pool.execute(
        "DELETE FROM taskstream.stream_tickets WHERE expires_at < clock_timestamp()"
    )
    return int(status.rpartition(" ")[2])


async def run_sweeper(pool: asyncpg.Pool, interval: float) -> None:
    """Every ``interval`` seconds, :func:`sweep`: tickets bought and never used expire in a
    table nobody else touches (a quiet server buys and redeems nothing)."""
    while True:
        await asyncio.sleep(interval)
        try:
            swept = await sweep(pool)
        except (*db.CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            logger.debug("ticket sweep failed: %s", type(exc).__name__)
            continue
        if swept:
            logger.debug("swept %d expired tickets", swept)
