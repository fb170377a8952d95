"""The Celery app and its task: nothing taskstream-specific beyond ``update_state``, which
Celery users already call to report progress."""

from __future__ import annotations

import os
import time

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.celery_app.settings")

app = Celery("celery_app")
app.config_from_object("django.conf:settings", namespace="CELERY")


@app.task(bind=True)
def steps(self, total: int, pause: float, fail_at: int | None = None) -> dict[str, int]:  # type: ignore[no-untyped-def]
    for i in range(1, total + 1):
        time.sleep(pause)
        if i == fail_at:
            raise ValueError(f"step {i} broke")
        self.update_state(state="PROGRESS", meta={"current": i, "total": total})
    time.sleep(pause)
    return {"done": total}
