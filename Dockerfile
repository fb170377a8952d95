# One taskstream instance. Run several behind a load balancer (see docker-compose.yml and
# deploy/nginx.conf): each holds its own LISTEN connection, so no sticky sessions are needed.
FROM python:3.12-slim
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY sql ./sql
RUN pip install . && useradd --system --no-create-home taskstream
USER taskstream
EXPOSE 8000
# Ready = the database answers and the LISTEN connection is up (GET /readyz, 503 otherwise).
# The slim image has no curl; Python's urllib fails on any non-2xx answer.
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
# SIGTERM drains: streams get a final retry: and close within TASKSTREAM_SHUTDOWN_GRACE.
STOPSIGNAL SIGTERM
CMD ["taskstream", "serve", "--host", "0.0.0.0", "--port", "8000"]
