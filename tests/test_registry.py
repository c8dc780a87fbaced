"""Registry repository functions against SQLite and, when one answers on 127.0.0.1:5432, PostgreSQL;
the request-log writer's spill and replay."""

from __future__ import annotations

import json
import socket
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

from core.errors import ConflictError, ExpertNotFoundError, NotFoundError
from registry import repository as repo
from registry.db import make_engine, migrate
from registry.request_log import RequestLogWriter

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _postgres_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            pass
        engine = make_engine(PG_URL)
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        return True
    except Exception:
        return False


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sessions(request, tmp_path):
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    else:
        if not _postgres_available():
            pytest.skip("no PostgreSQL answers on 127.0.0.1:5432 (database 'test', user postgres)")
        schema = "t_" + uuid.uuid4().hex[:10]
        admin = make_engine(PG_URL)
        with admin.begin() as conn:
            conn.execute(text(f"create schema {schema}"))
        engine = make_engine(f"{PG_URL}?options=-csearch_path%3D{schema}")

        def drop() -> None:
            engine.dispose()
            with admin.begin() as conn:
                conn.execute(text(f"drop schema {schema} cascade"))

        request.addfinalizer(drop)
    migrate(engine)
    migrate(engine)  # idempotent
    return sessionmaker(engine, expire_on_commit=False)


def test_experts_versions_and_status(sessions):
    with sessions.begin() as s:
        expert = repo.add_expert(s, "medical", "health")
        repo.add_expert_version(s, expert, "/a/v1", "fp-1", 8, ["q_proj"], {"loss": 1.0}, "data")
        repo.add_expert_version(s, expert, "/a/v2", "fp-1", 8, ["q_proj"], {"loss": 0.9}, "data")
    with sessions.begin() as s, pytest.raises(ConflictError):
        repo.add_expert(s, "medical")
    with sessions.begin() as s:
        expert = repo.require_expert(s, "medical")
        assert expert.current_version == 2 and repo.current_version(s, expert).adapter_path == "/a/v2"
        repo.set_expert_status(s, "medical", "retired")
        assert [e.name for e in repo.list_experts(s, ["active"])] == []
        with pytest.raises(ExpertNotFoundError):
            repo.require_expert(s, "legal")


def test_routers_promote_and_rollback(sessions):
    with sessions.begin() as s:
        for v in (1, 2, 3):
            repo.add_router_version(s, version=v, path=f"/r/{v}", experts=["a", "base"], metrics={"accuracy": v})
        repo.promote_router(s, 1)
        repo.promote_router(s, 2)
        assert repo.active_router(s).version == 2
        assert repo.next_router_version(s) == 4
    with sessions.begin() as s:
        assert repo.rollback_router(s).version == 1
        assert repo.active_router(s).version == 1
        with pytest.raises(NotFoundError):
            repo.rollback_router(s)


def test_request_logs_feedback_jobs(sessions):
    rows = [{"request_id": f"r{i}", "endpoint": "chat", "model": "auto", "prompt_hash": "h", "experts": [],
             "prompt": "p"} for i in range(3)]
    with sessions.begin() as s:
        assert repo.add_request_logs(s, rows) == 3
        assert repo.add_request_logs(s, rows) == 0  # replay is idempotent
        repo.add_feedback(s, "r1", "medical", 5.0)
        job = repo.create_job(s, "train_expert")
        repo.update_job(s, job.id, status="running", progress=0.5)
    with sessions() as s:
        assert repo.count_request_logs(s) == 3
        assert repo.get_job(s, job.id).progress == 0.5


def test_log_writer_spills_when_database_is_down_and_replays(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    migrate(engine)
    good = sessionmaker(engine, expire_on_commit=False)
    broken = sessionmaker(make_engine(f"sqlite:///{tmp_path / 'missing' / 'nope.db'}"))
    spill = tmp_path / "spill" / "requests.jsonl"
    writer = RequestLogWriter(broken, spill, flush_ms=10)
    for i in range(5):
        writer.log({"request_id": f"q{i}", "endpoint": "chat", "model": "auto", "prompt_hash": "h"})
    writer.flush()
    assert writer.spilled == 5 and spill.is_file()
    writer.sessions = good  # the database is back
    writer.log({"request_id": "q5", "endpoint": "chat", "model": "auto", "prompt_hash": "h"})
    writer.flush()
    assert not spill.exists()
    with good() as s:
        assert repo.count_request_logs(s) == 6


def test_log_writer_keeps_hostile_rows_and_never_blocks_on_a_bad_one(sessions, tmp_path):
    """A NUL in a prompt (PostgreSQL text refuses it), a spill line cut short by a crash and a row the
    database refuses: the good rows are all written, the bad ones are set aside, replay is not blocked."""
    spill = tmp_path / "spill" / "requests.jsonl"
    spill.parent.mkdir()
    good_line = json.dumps({"request_id": "s1", "endpoint": "chat", "model": "auto", "prompt_hash": "h"})
    spill.write_text(good_line + "\n" + '{"request_id": "s2", "endpo' + "\n")  # the crash cut the last line
    writer = RequestLogWriter(sessions, spill, flush_ms=10)
    writer.log({"request_id": "n1", "endpoint": "chat", "model": "auto", "prompt": "a\x00b", "prompt_hash": "h"})
    writer.log({"request_id": "bad", "endpoint": "chat", "model": "auto", "prompt_hash": "h", "nonsense": 1})
    writer.log({"request_id": "n2", "endpoint": "chat", "model": "auto", "prompt_hash": "h"})
    writer.flush()
    assert not spill.exists() and writer.replayed == 1 and writer.written == 2 and writer.rejected == 2
    with sessions() as s:
        assert repo.get_request_log(s, "n1").prompt == "a\ufffdb"
        assert {r for r in ("s1", "n1", "n2", "bad") if repo.get_request_log(s, r)} == {"s1", "n1", "n2"}
    rejected = [json.loads(line) for line in writer.reject_file.read_text().splitlines()]
    assert {"unreadable spill line"} < {r["error"] for r in rejected} and len(rejected) == 2
