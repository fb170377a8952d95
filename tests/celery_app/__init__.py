"""A minimal Django project with a Celery app, as a Celery user has one (docs/celery.md).

Results go to PostgreSQL through django-celery-results; taskstream streams that table."""
