"""The task rules in server/tasks.py and the SQL schema state the same limits and states."""

from __future__ import annotations

import re
from pathlib import Path

from server import db, tasks
from server.db import migration_files


def _schema() -> str:
    return "\n".join(sql for _name, sql in migration_files())


def _between(column: str, function: str = "char_length") -> tuple[int, int]:
    found = re.findall(rf"CHECK \({function}\({column}\) BETWEEN (\d+) AND (\d+)\)", _schema())
    assert found, f"no CHECK on {column}"
    assert len(set(found)) == 1, found
    low, high = found[0]
    return int(low), int(high)


def test_id_owner_and_state_lengths_match_the_check_constraints() -> None:
    assert _between("id") == (1, tasks.MAX_TASK_ID)
    assert _between("owner_id") == (1, tasks.MAX_TASK_ID)
    assert _between("user_id") == (1, tasks.MAX_TASK_ID)  # the tickets table's owner
    assert _between("state") == (1, tasks.MAX_STATE)


def test_ticket_task_count_matches_the_stream_limit() -> None:
    assert _between("task_ids", "cardinality") == (1, tasks.MAX_TASKS_PER_STREAM)


def test_eta_cap_is_the_integer_column_range() -> None:
    assert re.search(r"estimated_time integer CHECK \(estimated_time >= 0\)", _schema())
    assert tasks.MAX_ETA == 2**31 - 1  # PostgreSQL's integer


def test_terminal_states_have_one_definition() -> None:
    assert set(re.findall(r"'(\w+)'", db.TERMINAL_SQL)) == tasks.TERMINAL_STATES
    assert tasks.TERMINAL_STATES == {"success", "failed", "cancelled"}
    # The queries use the one SQL list, never their own spelling of it.
    source = Path(db.__file__).read_text(encoding="utf-8")
    assert "'cancelled'" not in source.replace(db.TERMINAL_SQL, "")
