"""NATS subject names for the fan-out bus (pure functions, no I/O).

A task's changes go to ``<prefix>.task.<token>`` and, for owner-wide streams, to
``<prefix>.owner.<token>``; the relay's announcements go to ``<prefix>.control``. Task and owner
ids may hold any character NATS gives a meaning to (``.``, ``*``, ``>``, spaces), so each id
travels as one base64url token (no padding): an id can never split into two subject tokens or
turn into a wildcard, and decoding gives it back exactly.
"""

from __future__ import annotations

import base64
import re

__all__ = [
    "InvalidSubjectPrefix",
    "SubjectError",
    "Subjects",
    "decode_token",
    "encode_token",
]

# One or more tokens of letters, digits, '_' and '-' joined by dots: never a wildcard.
_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


class SubjectError(ValueError):
    """A subject that is not one of ours (or a token that is not valid base64url)."""


class InvalidSubjectPrefix(ValueError):
    """A subject prefix that is not dot-separated tokens of ``[A-Za-z0-9_-]``."""


def encode_token(value: str) -> str:
    """One subject token for any id: base64url of its UTF-8, unpadded; ``-`` for the empty id
    (which base64 never produces on its own, so the two cannot collide)."""
    if not value:
        return "-"
    return base64.urlsafe_b64encode(value.encode("utf-8")).rstrip(b"=").decode("ascii")


def decode_token(token: str) -> str:
    if token == "-":
        return ""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        return raw.decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise SubjectError(f"not a base64url token: {token[:40]!r}") from None


class Subjects:
    """The subject names under one prefix (one prefix per fleet and database)."""

    __slots__ = ("_owner", "_task", "control", "prefix")

    def __init__(self, prefix: str = "taskstream") -> None:
        if not _PREFIX.fullmatch(prefix):
            raise InvalidSubjectPrefix(
                f"NATS subject prefix must be dot-separated tokens of letters, digits, '_' and "
                f"'-', got {prefix[:60]!r}"
            )
        self.prefix = prefix
        self._task = f"{prefix}.task."
        self._owner = f"{prefix}.owner."
        self.control = f"{prefix}.control"

    def task(self, task_id: str) -> str:
        return self._task + encode_token(task_id)

    def owner(self, owner_id: str) -> str:
        return self._owner + encode_token(owner_id)

    def parse(self, subject: str) -> tuple[str, str]:
        """``("task", id)``, ``("owner", id)`` or ``("control", "")``; :class:`SubjectError`
        for anything else."""
        if subject == self.control:
            return "control", ""
        for kind, head in (("task", self._task), ("owner", self._owner)):
            if subject.startswith(head):
                return kind, decode_token(subject[len(head) :])
        raise SubjectError(f"not a taskstream subject: {subject[:80]!r}")
