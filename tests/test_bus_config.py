"""The bus's settings and subject names: what an operator can get wrong is refused clearly,
and any task or owner id maps to exactly one subject token and back."""

from __future__ import annotations

import asyncio
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.config import ConfigError, Settings
from server.stream.subjects import SubjectError, Subjects, decode_token, encode_token
from tests.conftest import SECRET
from tests.natscluster import free_ports
from tests.test_cli import _clean_env
from tests.test_nginx import ROOT

pytestmark = pytest.mark.timeout(60)


@given(st.text(max_size=200))
def test_any_id_is_one_subject_token_and_decodes_back(task_id: str) -> None:
    token = encode_token(task_id)
    assert token and not any(c in token for c in ".*> \t\r\n")
    assert decode_token(token) == task_id
    subjects = Subjects("ts")
    assert subjects.parse(subjects.task(task_id)) == ("task", task_id)
    assert subjects.parse(subjects.owner(task_id)) == ("owner", task_id)


def test_ids_with_dots_spaces_and_wildcards_do_not_collide() -> None:
    subjects = Subjects("taskstream")
    ids = ["a.b", "a b", "a", "b", "*", ">", "a.>", "", "ä.ö"]
    names = [subjects.task(i) for i in ids]
    assert len(set(names)) == len(ids)
    assert all(name.count(".") == 2 for name in names)
    with pytest.raises(SubjectError):
        subjects.parse("other.task.YQ")


@pytest.mark.parametrize("prefix", ["", "a..b", "a.*", "a b", "a.>", ".a"])
def test_a_bad_subject_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigError, match="TASKSTREAM_NATS_SUBJECT_PREFIX"):
        Settings.from_env({"TASKSTREAM_NATS_SUBJECT_PREFIX": prefix or " . "})


@pytest.mark.parametrize(
    "url", ["http://n:4222", "n:4222", "nats://", "nats://a b:4222", "nats://u:secret@"]
)
def test_a_bad_nats_url_is_refused_without_its_secret(url: str) -> None:
    with pytest.raises(ConfigError, match="TASKSTREAM_NATS_URL") as info:
        Settings.from_env({"TASKSTREAM_NATS_URL": url})
    assert "secret" not in str(info.value)


def test_nats_urls_are_read_as_a_list() -> None:
    s = Settings.from_env({"TASKSTREAM_NATS_URL": " nats://a:1 ,tls://b:2,"})
    assert s.nats_urls == ("nats://a:1", "tls://b:2")
    assert Settings.from_env({}).nats_urls == ()


async def test_serve_refuses_to_start_when_no_nats_server_answers(database_url: str) -> None:
    (port,) = free_ports(1)  # nothing listens there
    env = _clean_env(
        DATABASE_URL=database_url,
        TASKSTREAM_JWT_SECRET=SECRET,
        PYTHONPATH=str(ROOT),
        TASKSTREAM_NATS_URL=f"nats://user:hunter2@127.0.0.1:{port}",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "serve",
        "--port",
        "0",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 40)
    text = (out + err).decode()
    assert proc.returncode == 1, text
    assert "no NATS server answered at nats://127.0.0.1:" in text, text
    assert "hunter2" not in text and "Traceback" not in text, text
