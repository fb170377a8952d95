"""The terminal client lives apart from the server (server/client/): it imports no server module,
its own dependency (httpx-sse) is the ``client`` extra, and without that extra ``watch`` says in
one line what to install while the server and ``create`` work on."""

from __future__ import annotations

import asyncio
import sys
import tomllib
from pathlib import Path

from server.client.terminal import TERMINAL_STATES
from server.events import TERMINAL_STATES as SERVER_TERMINAL_STATES
from tests.test_cli_client import Result, _env, finish

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Run as a user would, with the client extra's modules made unimportable (as if not installed).
WITHOUT_CLIENT_EXTRA = "import sys; sys.modules['httpx_sse'] = None; "


async def _run_python(code: str, *args: str, env: dict[str, str] | None = None) -> Result:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        *args,
        env=env if env is not None else _env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    return await finish(proc, timeout=60)


def test_client_terminal_states_agree_with_the_server() -> None:
    assert TERMINAL_STATES == SERVER_TERMINAL_STATES


async def test_client_imports_no_server_module() -> None:
    code = (
        "import sys, server.client.terminal; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('server', 'quart') "
        "and m != 'server' and not m.startswith('server.client')))"
    )
    r = await _run_python(code)
    assert (r.code, r.stdout.strip()) == (0, "[]"), r


async def test_httpx_sse_is_the_client_extra_and_the_server_runs_without_it() -> None:
    project = PYPROJECT["project"]
    assert not any(d.startswith("httpx-sse") for d in project["dependencies"])
    assert any(d.startswith("httpx-sse") for d in project["optional-dependencies"]["client"])
    assert "taskstream[client]" in project["optional-dependencies"]["test"]
    # Every server module imports without the extra (the client's own package aside).
    code = WITHOUT_CLIENT_EXTRA + (
        "import importlib, pkgutil, server; "
        "names = [m.name for m in pkgutil.walk_packages(server.__path__, 'server.') "
        "if not m.name.startswith('server.client') and m.name != 'server.__main__']; "
        "[importlib.import_module(n) for n in names]; print(len(names))"
    )
    r = await _run_python(code)
    assert r.code == 0 and int(r.stdout) > 20, r


async def test_watch_without_the_client_extra_says_what_to_install(database_url: str) -> None:
    cli = WITHOUT_CLIENT_EXTRA + "from server.cli import main; raise SystemExit(main(sys.argv[1:]))"
    r = await _run_python(cli, "watch", "t1", "--url", "http://127.0.0.1:1", "--token", "x")
    assert r.code == 2 and "Traceback" not in r.stderr, r
    assert r.stdout.count("\n") == 1 and "install taskstream[client]" in r.last_line, r
    # create and update write the database with what the server installs.
    env = _env(DATABASE_URL=database_url)
    r = await _run_python(cli, "create", "--owner", "alice", "--id", "no-extra", env=env)
    assert (r.code, r.stdout.strip()) == (0, "no-extra"), r
