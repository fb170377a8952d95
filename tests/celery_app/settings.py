"""Django settings for the Celery integration test: the database and the broker come from the
environment (``TASKSTREAM_CELERY_DATABASE_URL``, ``TASKSTREAM_CELERY_BROKER_URL``)."""

from __future__ import annotations

import os
from urllib.parse import parse_qs, unquote, urlsplit

_db = urlsplit(os.environ.get("TASKSTREAM_CELERY_DATABASE_URL", "postgresql://localhost/app"))
# libpq URLs may name the server in the query instead (the embedded PostgreSQL's unix socket:
# `postgresql://user@/db?host=/path/to/dir`); such a `host`/`port` wins, as it does for libpq.
_query = {key: values[-1] for key, values in parse_qs(_db.query).items()}

SECRET_KEY = "taskstream-celery-test-only"  # noqa: S105 - a throwaway test project
USE_TZ = True
INSTALLED_APPS = ["django_celery_results"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _db.path.lstrip("/"),
        "USER": unquote(_db.username or ""),
        "PASSWORD": unquote(_db.password or ""),
        "HOST": _query.get("host", _db.hostname or ""),
        "PORT": _query.get("port", str(_db.port or "")),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# The recipe's three settings (docs/celery.md): results in PostgreSQL, and a row as soon as a
# task starts, so its watchers see it running before its first update_state.
CELERY_BROKER_URL = os.environ.get("TASKSTREAM_CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_RESULT_BACKEND = "django-db"
CELERY_TASK_TRACK_STARTED = True
