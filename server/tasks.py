"""Task rules, in one place: what a task is (:class:`TaskState`), its terminal states and limits.

The SQL schema (``sql/``) states the same limits in its CHECK constraints and :mod:`server.db`
builds its terminal-state filter from :data:`TERMINAL_STATES`; ``tests/test_task_rules.py``
proves the two agree.

A :class:`TaskState` is built once per notification and shared by every subscriber of that task.
Its encodings are cached on it (the JSON here, the SSE event by :mod:`server.stream.encoder`, the
HTTP/1.1 chunk by :mod:`server.hypercorn_internals`), so fan-out to N clients encodes once.

It is also where a missing ``estimated_time`` is derived (:func:`derive_eta`): once per state, in
:meth:`TaskState.progress_data`, the one place task state becomes an event or an API body.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, overload

__all__ = [
    "MAX_ERROR",
    "MAX_ETA",
    "MAX_GROUP_TASKS",
    "MAX_METADATA",
    "MAX_METADATA_SQL",
    "MAX_STATE",
    "MAX_TASKS_PER_STREAM",
    "MAX_TASK_ID",
    "TERMINAL_STATES",
    "Change",
    "GroupClosed",
    "TaskState",
    "derive_eta",
    "metadata_problem",
    "new_task_id",
    "parse_notification",
    "validate_task_id",
]

# Terminal states: a task cannot change after them (the API's PATCH refuses, streams end there).
TERMINAL_ORDER = ("success", "failed", "cancelled")
TERMINAL_STATES = frozenset(TERMINAL_ORDER)

# Lengths and bounds, as the schema's CHECK constraints state them (sql/001_tasks.sql,
# sql/003_tickets.sql).
MAX_TASK_ID = 200  # also the owner id's bound
MAX_STATE = 64
MAX_ERROR = 1000  # what a writer may set through the API (the column itself is unbounded)
MAX_TASKS_PER_STREAM = 100  # ids on one stream, and on one ticket
# The largest ETA reported (the writer's column is a PostgreSQL integer, so is the derived value).
MAX_ETA = 2_147_483_647
# A task's metadata: a JSON object of at most this many bytes as compact UTF-8 JSON (the API's
# rule). The schema's CHECK allows twice as much in jsonb's text form, which adds spaces
# (sql/005_groups_metadata.sql); a notification too large for it says "fetch" instead.
MAX_METADATA = 2048
MAX_METADATA_SQL = 4096
MAX_METADATA_DEPTH = 32
# Tasks per group (sequence numbers: the schema's CHECK on taskstream.groups.last_seq).
MAX_GROUP_TASKS = 1000

_BAD_ID = re.compile(r"[\x00-\x1f\x7f]")


def validate_task_id(task_id: str) -> str | None:
    """Return why ``task_id`` cannot name a task, or None if it can."""
    if not task_id or len(task_id) > MAX_TASK_ID:
        return f"task id must be 1 to {MAX_TASK_ID} characters"
    if _BAD_ID.search(task_id):
        return "task id must not contain control characters"
    return None


def _plain_json_problem(value: Any, depth: int) -> str | None:
    """Why a parsed JSON value cannot be stored as it is (None: it can)."""
    if depth > MAX_METADATA_DEPTH:
        return f"metadata must nest at most {MAX_METADATA_DEPTH} levels"
    if isinstance(value, str):
        # PostgreSQL's jsonb refuses the NUL character, and UTF-8 a lone surrogate.
        if "\x00" in value:
            return "metadata must not contain the NUL character"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "metadata strings must be valid Unicode"
        return None
    if isinstance(value, float):
        # jsonb writes numbers out in full: 1e300 would become 301 digits.
        if not math.isfinite(value) or len(format(Decimal(repr(value)), "f")) > 40:
            return "metadata numbers must be finite and at most 40 digits written out"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return "metadata keys must be strings"
            problem = _plain_json_problem(key, depth) or _plain_json_problem(item, depth + 1)
            if problem is not None:
                return problem
    elif isinstance(value, list):
        for item in value:
            if (problem := _plain_json_problem(item, depth + 1)) is not None:
                return problem
    elif not (value is None or isinstance(value, bool | int)):
        return "metadata must be plain JSON"
    return None


def metadata_problem(value: Any) -> str | None:
    """Return why ``value`` cannot be a task's metadata, or None if it can."""
    if not isinstance(value, dict):
        return "metadata must be a JSON object"
    problem = _plain_json_problem(value, 1)
    if problem is not None:
        return problem
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode("utf-8")) > MAX_METADATA:
        return f"metadata must be at most {MAX_METADATA} bytes as compact JSON"
    return None


def _metadata(value: Any) -> dict[str, Any] | None:
    """Metadata as read from a row (asyncpg returns jsonb as text) or a notification."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            # An SQL writer may nest deeper than Python's parser goes (the schema bounds size,
            # not depth): the task still streams, without its metadata.
            return None
    return value if isinstance(value, dict) else None


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return str(value)


def _utc(value: str | None) -> str | None:
    """A timestamp from a NOTIFY payload (in the writer's session time zone), in the same UTC
    ISO 8601 form as one read from a row, so every event and body formats times alike."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value).astimezone(UTC).isoformat()
    except ValueError:
        return value


def _epoch(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def derive_eta(
    progress: float,
    updated_at: str | None,
    started_at: str | None,
    start_progress: float | None,
) -> int | None:
    """Seconds left at the observed rate since the task started, or None if it cannot be told.

    With the start anchor ``(t0, p0)`` = (``started_at``, ``start_progress``) and the current
    observation ``(t, p)`` = (``updated_at``, ``progress``)::

        rate = (p - p0) / (t - t0)            # percent per second since the task started
        eta  = (100 - p) / rate = (t - t0) * (100 - p) / (p - p0)

    rounded to whole seconds. It is None when there is no anchor yet, when no time has passed or
    no progress was made since it (``t <= t0`` or ``p <= p0``), and at 100 %, so it is never
    negative and never a division by zero. The value is as of ``updated_at``: a client that wants a
    countdown subtracts the time elapsed since then.
    """
    if start_progress is None or progress >= 100 or progress <= start_progress:
        return None
    t0, t = _epoch(started_at), _epoch(updated_at)
    if t0 is None or t is None or t <= t0:
        return None
    eta = (t - t0) * (100.0 - progress) / (progress - start_progress)
    return min(MAX_ETA, max(0, round(eta)))


def new_task_id() -> str:
    """``task_`` and 16 URL-safe random characters (96 bits)."""
    return "task_" + secrets.token_urlsafe(12)


@dataclass(slots=True)
class TaskState:
    """One committed version of a task (or its deletion)."""

    id: str
    owner_id: str
    version: int
    state: str = "pending"
    progress: float = 0.0
    estimated_time: int | None = None
    error: str | None = None
    error_truncated: bool = False
    created_at: str | None = None
    updated_at: str | None = None
    deleted: bool = False
    # Epoch seconds stamped by the trigger (clock_timestamp()), for push-latency measurements.
    committed_ts: float | None = None
    # The ETA anchor kept by the trigger (sql/002_task_started.sql): when work was first seen.
    started_at: str | None = None
    start_progress: float | None = None
    # When the task passed to this owner (sql/004_owner_since.sql); None: since it was created.
    owner_since: str | None = None
    # The task's group and its sequence number in it (sql/005_groups_metadata.sql), or None.
    group_id: str | None = None
    group_seq: int | None = None
    # The task's metadata (a small JSON object), or None.
    metadata: dict[str, Any] | None = None
    # The notification left the metadata out (too large for NOTIFY): the registry reads the row.
    fetch: bool = False
    # The memo of `eta`; init=False so that dataclasses.replace() never copies a stale one.
    _eta: int | None = field(default=None, init=False, repr=False, compare=False)
    _eta_known: bool = field(default=False, init=False, repr=False, compare=False)
    _progress_json: str | None = field(default=None, repr=False, compare=False)
    # Memos of this state's wire encodings, filled on first use by the one module that makes
    # each (the SSE events: server/stream/encoder.py; the HTTP/1.1 chunk of the progress event:
    # server/hypercorn_internals.py), so every watcher shares one copy.
    memo_event: bytes | None = field(default=None, init=False, repr=False, compare=False)
    memo_chunk: bytes | None = field(default=None, init=False, repr=False, compare=False)
    # The encoded ``complete`` events (single-task, multi-task).
    memo_complete: dict[bool, bytes] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_notification(cls, payload: str) -> TaskState:
        return cls.from_payload(json.loads(payload))

    @classmethod
    def from_payload(cls, d: dict[str, Any]) -> TaskState:
        """A notification's state from its decoded JSON object."""
        return cls(
            id=d["id"],
            owner_id=d["owner_id"],
            version=int(d["version"]),
            state=d.get("state", "pending"),
            progress=float(d.get("progress", 0.0)),
            estimated_time=d.get("estimated_time"),
            error=d.get("error"),
            error_truncated=bool(d.get("error_truncated", False)),
            created_at=_utc(d.get("created_at")),
            updated_at=_utc(d.get("updated_at")),
            deleted=bool(d.get("deleted", False)),
            committed_ts=d.get("ts"),
            started_at=_utc(d.get("started_at")),
            start_progress=_float_or_none(d.get("start_progress")),
            owner_since=_utc(d.get("owner_since")),
            group_id=d.get("group_id"),
            group_seq=d.get("group_seq"),
            metadata=_metadata(d.get("metadata")),
            fetch=bool(d.get("fetch", False)),
        )

    @classmethod
    def from_row(cls, row: dict[str, Any], *, error_max_chars: int = 1000) -> TaskState:
        error = row.get("error")
        truncated = error is not None and len(error) > error_max_chars
        return cls(
            id=row["id"],
            owner_id=row["owner_id"],
            version=int(row["version"]),
            state=row["state"],
            progress=float(row["progress"]),
            estimated_time=row["estimated_time"],
            error=error[:error_max_chars] if truncated and error is not None else error,
            error_truncated=truncated,
            created_at=_iso(row.get("created_at")),
            updated_at=_iso(row.get("updated_at")),
            started_at=_iso(row.get("started_at")),
            start_progress=_float_or_none(row.get("start_progress")),
            owner_since=_iso(row.get("owner_since")),
            group_id=row.get("group_id"),
            group_seq=row.get("group_seq"),
            metadata=_metadata(row.get("metadata")),
        )

    @classmethod
    def gone(cls, task_id: str) -> TaskState:
        """What a subscriber gets for a task that was deleted or is not (or no longer) theirs:
        the two read the same, so a stream never tells another owner's task from a missing one."""
        return cls(id=task_id, owner_id="", version=0, deleted=True)

    @property
    def eta(self) -> int | None:
        """None for a finished (or deleted) task, else the writer's ``estimated_time`` if set,
        else the derived one.

        A finished task has no time left to estimate: null, not 0, because 0 would read as
        "done any second now" on a task that failed or was cancelled. Writers often leave their
        last ``estimated_time`` in the row when they set the final state, so it must not leak.
        Computed at most once per state, however many clients and requests read it.
        """
        if not self._eta_known:
            if self.terminal or self.deleted:
                self._eta = None
            elif self.estimated_time is not None:
                self._eta = self.estimated_time
            else:
                self._eta = derive_eta(
                    self.progress, self.updated_at, self.started_at, self.start_progress
                )
            self._eta_known = True
        return self._eta

    def progress_data(self) -> dict[str, Any]:
        """The ``progress`` event's JSON object (also the core of the REST representation).

        ``metadata`` is there only when the task has some, so a task without it sends exactly
        the bytes it always did."""
        data: dict[str, Any] = {
            "task_id": self.id,
            "state": self.state,
            "progress": self.progress,
            "estimated_time": self.eta,
            "updated_at": self.updated_at,
            "version": self.version,
        }
        if self.metadata is not None:
            data["metadata"] = self.metadata
        return data

    def api_data(self) -> dict[str, Any]:
        """The REST representation: the ``progress`` event's fields plus the task's details."""
        data = self.progress_data()
        data["error"] = self.error
        data["owner_id"] = self.owner_id
        data["created_at"] = self.created_at
        data["started_at"] = self.started_at
        data["group_id"] = self.group_id
        data["metadata"] = self.metadata
        return data

    def progress_json(self) -> str:
        """The ``progress`` data, encoded once per state however many clients receive it."""
        if self._progress_json is None:
            self._progress_json = json.dumps(self.progress_data(), separators=(",", ":"))
        return self._progress_json


@dataclass(frozen=True, slots=True)
class GroupClosed:
    """A group's owner closed it: no task joins it any more (sql/005_groups_metadata.sql)."""

    group_id: str
    owner_id: str

    @classmethod
    def from_notification(cls, payload: dict[str, Any]) -> GroupClosed:
        return cls(group_id=str(payload["group_closed"]), owner_id=str(payload["owner_id"]))


# What one notification on the channel is: a task's committed state, or a group's closing.
Change = TaskState | GroupClosed


# Whether a notification's task (its decoded ``id`` and ``owner_id``) is of interest here.
Wanted = Callable[[Any, Any], bool]


@overload
def parse_notification(payload: str) -> Change: ...
@overload
def parse_notification(payload: str, wanted: Wanted) -> Change | None: ...
def parse_notification(payload: str, wanted: Wanted | None = None) -> Change | None:
    """Parse one notification (raises ValueError, KeyError or TypeError if malformed).

    With ``wanted``, a task state that it declines is None: it is decoded (C code) but never
    built into a :class:`TaskState` (timestamps parsed, Python objects made), the larger part of
    a notification's cost, which a process pays for every change on the channel whoever watches
    it. A group's closing is always returned.
    """
    try:
        d = json.loads(payload)
        if not isinstance(d, dict):
            raise TypeError("a notification is a JSON object")
        if "group_closed" in d and "id" not in d:
            return GroupClosed.from_notification(d)
        if wanted is not None and not wanted(d.get("id"), d.get("owner_id")):
            return None
        return TaskState.from_payload(d)
    except RecursionError:
        # Metadata nested deeper than the parser goes. The trigger appends it last, and an
        # unescaped `, "metadata" : ` cannot occur inside a JSON string: parse the rest, and let
        # the registry read the row (whose metadata then reads as None) like a "fetch" payload.
        cut = payload.find(', "metadata" : ')
        if cut < 0:
            raise ValueError("notification nested too deeply") from None
        state = TaskState.from_notification(payload[:cut] + "}")
        state.fetch = True
        return state
