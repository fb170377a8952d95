"""The application backend's side (docs/celery.md): grant the task to its user, then enqueue it.

Run as ``python -m tests.celery_app.enqueue USER TASK_ID TOTAL PAUSE [FAIL_AT]``."""

from __future__ import annotations

import sys

import django
from django.db import connection, transaction


def main(argv: list[str]) -> None:
    django.setup()
    from tests.celery_app.worker import steps

    user, task_id, total, pause = argv[0], argv[1], int(argv[2]), float(argv[3])
    fail_at = int(argv[4]) if len(argv) > 4 else None
    # The grant and the enqueue: the task is the user's before the worker writes its first row.
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT taskstream.grant_task(%s, %s)", [f"celery:{task_id}", user])
    steps.apply_async(args=[total, pause, fail_at], task_id=task_id)


if __name__ == "__main__":
    import os

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.celery_app.settings")
    main(sys.argv[1:])
