"""The `moe` command line for people and scripts: quiet by default (`--verbose` brings library logging back),
bad input refused before the backbone loads, `--json` on the list commands, gain and traffic in `expert list`.

No backbone here: the commands that would load one get a loader that fails the test if it is called."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from cli.logs import PRODUCT_LOGGERS, configure_logging
from cli.main import build_parser, main
from core.settings import Settings
from registry import repository as repo
from registry.db import session_factory
from registry.models import RouterStatus, utcnow
from tests.test_registry import sessions  # noqa: F401  (SQLite, and PostgreSQL when one answers)

ROOT = Path(__file__).resolve().parents[1]
QUIET_ENV = ("MLFLOW_LOGGING_LEVEL", "HF_HUB_DISABLE_PROGRESS_BARS")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """MOE_HOME for in-process `main`; the environment and the logging setup `main` changes are restored."""
    saved_env = dict(os.environ)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_levels = {name: logging.getLogger(name).level for name in PRODUCT_LOGGERS}
    monkeypatch.setenv("MOE_HOME", str(tmp_path / "home"))
    yield tmp_path / "home"
    root.handlers[:], root.level = saved_handlers, saved_level
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)
    os.environ.clear()
    os.environ.update(saved_env)


def never_load(settings: Settings):
    raise AssertionError("the backbone was loaded for a check that needs no model")


def moe(*argv: str, home: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m cli ...` in a fresh process, so the logging configuration is the real one."""
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
    env.update(MOE_HOME=str(home), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cli", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run in process with a loader that must not be called; return the one-line error."""
    assert main(list(argv), load_backbone=never_load) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ---- quiet by default, --verbose brings the libraries' INFO back ---------------------------


def test_list_commands_are_quiet(tmp_path):
    for argv in (("expert", "list"), ("router", "list")):
        result = moe(*argv, home=tmp_path / "home")
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        for stream in (result.stdout, result.stderr):
            assert "INFO" not in stream and "alembic" not in stream
    assert moe("expert", "list", home=tmp_path / "home").stdout.split() == [
        "name", "status", "version", "gain", "traffic", "description"]


@pytest.mark.parametrize("argv", [("--verbose", "expert", "list"), ("expert", "list", "-v")])
def test_verbose_brings_library_info_back(tmp_path, argv):
    result = moe(*argv, home=tmp_path / "home")  # a fresh home: the registry migrations log at INFO
    assert result.returncode == 0, result.stderr
    assert "INFO alembic" in result.stderr
    assert "INFO" not in result.stdout


def test_quiet_logging_keeps_our_progress_and_everyones_warnings(home, capsys):
    configure_logging(0)
    logging.getLogger("pipelines.train_expert").info("medical: epoch 1 held-out loss 2.1")
    logging.getLogger("alembic.runtime.migration").info("Running upgrade")
    logging.getLogger("httpx").warning("disk almost full")
    err = capsys.readouterr().err
    assert err.splitlines() == ["medical: epoch 1 held-out loss 2.1", "warning: disk almost full"]
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"  # MLflow reads it at import, before any command
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"


def test_verbose_counts_before_or_after_the_command():
    parser = build_parser()
    assert parser.parse_args(["expert", "list"]).verbose == 0
    assert parser.parse_args(["-v", "expert", "list"]).verbose == 1
    assert parser.parse_args(["expert", "list", "--verbose"]).verbose == 1
    assert parser.parse_args(["-vv", "router", "list"]).verbose == 2


# ---- checks that need no model answer before the backbone loads ------------------------------


def test_bad_name_fails_fast_without_loading_torch(tmp_path):
    data = tmp_path / "f.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    code = ("import sys; from cli.main import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules, 'experts.backbone' in sys.modules); sys.exit(rc)")
    env = {**os.environ, "MOE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, "expert", "add", "Bad-Name", "--data", str(data)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2
    assert result.stderr.startswith("error: Invalid expert name 'Bad-Name'") and result.stderr.count("\n") == 1
    assert result.stdout.split() == ["False", "False"]  # neither torch nor the backbone module was imported
    assert elapsed < 10  # well under a second on an idle machine; CI cores are shared
    assert not (tmp_path / "home").exists()  # refused before the registry was even opened


def test_expert_add_refuses_bad_input_before_the_backbone(home, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(8)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "q", "response": "a"}\n{not json\n')
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    assert "reserved" in refused(capsys, "expert", "add", "base", "--data", str(good))
    assert "exactly one of" in refused(capsys, "expert", "add", "hr", "--data", str(good), "--adapter", str(pickled))
    assert "exactly one of" in refused(capsys, "expert", "add", "hr")
    assert "does not exist" in refused(capsys, "expert", "add", "hr", "--data", str(tmp_path / "missing.jsonl"))
    assert "line 2" in refused(capsys, "expert", "add", "hr", "--data", str(broken))
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(2)))
    assert "at least 4 needed" in refused(capsys, "expert", "add", "hr", "--data", str(few))
    assert "line 1" in refused(capsys, "expert", "add", "hr", "--data", str(good), "--prompts", str(good))
    assert "pickled" in refused(capsys, "expert", "add", "hr", "--adapter", str(pickled))
    assert "does not exist" in refused(capsys, "expert", "add", "hr", "--adapter", str(tmp_path / "nowhere"))
    with session_factory(Settings(home=home)).begin() as session:
        repo.add_expert(session, "hr", "people")
    assert "already exists" in refused(capsys, "expert", "add", "hr", "--data", str(good))


def test_expert_prompts_adds_routing_prompts_to_a_registered_expert(home, tmp_path, capsys):
    """`moe expert prompts NAME --prompts FILE`: unknown experts and bad files are refused before anything changes;
    new prompts are split into train and validation as at registration, texts it already has are skipped, and they
    carry the source that makes a warm start train them as new rows."""
    from experts.seed import split_texts
    from pipelines.routing_prompts import ADDED_PROMPTS_SOURCE
    from pipelines.train_router import NEW_ROW_SOURCES

    texts = [f"how many days of annual leave do I have left, question {i}" for i in range(12)]
    prompts = tmp_path / "hr_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"nope": 1}\n')
    assert "does not exist" in refused(capsys, "expert", "prompts", "hr", "--prompts", str(prompts))
    with session_factory(Settings(home=home)).begin() as session:
        repo.add_expert(session, "hr", "people")
        repo.add_routing_examples(session, "hr", texts[:2], "train", "data")
    assert "line 2" in refused(capsys, "expert", "prompts", "hr", "--prompts", str(broken))
    assert main(["expert", "prompts", "hr", "--prompts", str(prompts), "--no-router"], load_backbone=never_load) == 0
    train, val = split_texts(texts[2:])
    assert (f"expert hr: {len(train)} training and {len(val)} validation routing prompts added (2 already known)"
            in capsys.readouterr().out)
    with session_factory(Settings(home=home))() as session:
        rows = [r for r in repo.routing_examples(session, ["hr"]) if r.source == ADDED_PROMPTS_SOURCE]
    assert sorted(r.text for r in rows if r.split == "train") == sorted(train)
    assert sorted(r.text for r in rows if r.split == "val") == sorted(val)
    assert ADDED_PROMPTS_SOURCE.startswith(NEW_ROW_SOURCES)
    assert main(["expert", "prompts", "hr", "--prompts", str(prompts)], load_backbone=never_load) == 0  # no retrain
    out = capsys.readouterr().out
    assert "0 training and 0 validation routing prompts added (12 already known)" in out and "nothing new" in out


def test_routing_commands_refuse_before_the_backbone(home, tmp_path, capsys):
    texts = tmp_path / "in.jsonl"
    texts.write_text('{"text": "hello"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "q", "answer": "a"}\n')
    assert "line 2" in refused(capsys, "route", "--input", str(bad))
    assert "No router is active" in refused(capsys, "route", "--input", str(texts))
    assert "No router is active" in refused(capsys, "eval", "qa", "--input", str(qa))
    assert "labelled requests" in refused(capsys, "router", "retrain", "--from-logs")
    assert "ISO date" in refused(capsys, "router", "retrain", "--from-logs", "--since", "yesterday")
    assert "has routing prompts" in refused(capsys, "router", "train")


def test_bad_settings_and_deploy_config_are_one_line(home, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOE_PORT", "eighty")
    assert "MOE_PORT" in refused(capsys, "expert", "list")
    monkeypatch.delenv("MOE_PORT")
    pools = tmp_path / "pools.yaml"
    pools.write_text("pools: 3\n")
    monkeypatch.setenv("MOE_DEPLOY_CONFIG", str(pools))
    assert "pools" in refused(capsys, "up")  # before the backbone loads and Ray starts


# ---- --json, gain and traffic -------------------------------------------------------------


def _log(request_id: str, experts: list[str], hours_ago: float, forced: str | None = None) -> dict:
    return {"request_id": request_id, "created_at": utcnow() - timedelta(hours=hours_ago), "endpoint": "chat",
            "model": forced or "auto", "forced_expert": forced, "router_version": 1, "confidence": 0.9,
            "experts": [{"name": n, "weight": 1.0} for n in experts], "prompt": "p", "prompt_hash": "h"}


@pytest.fixture
def registry(home: Path) -> Path:
    """Two trained experts and one imported, a router, and request logs: inside the last 24 h the router sent
    3 requests to medical, 1 to finance and 1 to the bare backbone; forced and older requests do not count."""
    with session_factory(Settings(home=home)).begin() as session:
        for name, metrics in (("medical", {"eval_loss_base": 4.0, "eval_loss_expert": 3.0}),
                              ("finance", {"eval_loss_base": 3.0, "eval_loss_expert": 3.3}), ("imported", {})):
            expert = repo.add_expert(session, name, f"{name} questions")
            repo.add_expert_version(session, expert, f"/a/{name}", "fp", 8, ["q_proj"], metrics,
                                    "adapter" if name == "imported" else "data")
        repo.add_router_version(session, version=1, path="/r/v1", experts=["finance", "medical", "base"],
                                metrics={"accuracy": 0.9, "n": 40, "abstain_rate": 0.05}, data_summary={},
                                status=RouterStatus.CANDIDATE)
        repo.promote_router(session, 1)
        repo.add_request_logs(session, [
            _log("r1", ["medical"], 1), _log("r2", ["medical", "finance"], 2), _log("r3", ["medical"], 23),
            _log("r4", ["finance"], 3), _log("r5", ["base"], 4), _log("r6", ["finance"], 1, forced="finance"),
            _log("r7", ["finance"], 30),
        ])
    return home


def test_expert_list_json_has_gain_and_traffic(registry, capsys):
    assert main(["expert", "list", "--json"], load_backbone=never_load) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"medical", "finance", "imported"}
    medical = rows["medical"]
    assert set(medical) >= {"name", "status", "version", "description", "heldout_nll_base", "heldout_nll_expert",
                            "heldout_gain", "traffic_share", "routed_requests"}
    assert medical["heldout_gain"] == pytest.approx(0.25) and medical["traffic_share"] == pytest.approx(3 / 5)
    assert rows["finance"]["heldout_gain"] == pytest.approx(-0.1) and rows["finance"]["routed_requests"] == 1
    assert rows["imported"]["heldout_gain"] is None and rows["imported"]["traffic_share"] == 0
    assert main(["expert", "list", "--json", "--hours", "48"], load_backbone=never_load) == 0
    wider = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert wider["finance"]["routed_requests"] == 2 and wider["medical"]["traffic_share"] == pytest.approx(3 / 6)


def test_expert_list_table_shows_gain_and_traffic(registry, capsys):
    assert main(["expert", "list"], load_backbone=never_load) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert lines["medical"][:5] == ["medical", "active", "1", "+25%", "60%"]
    assert lines["finance"][3:5] == ["-10%", "20%"]
    assert lines["imported"][3:5] == ["-", "0%"]


def test_router_list_json(registry, capsys):
    assert main(["router", "list", "--json"], load_backbone=never_load) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["version"] == 1 and row["status"] == "active" and row["accuracy"] == 0.9
    assert row["experts"] == ["finance", "medical", "base"] and row["promoted_at"] is not None


def test_listing_queries_on_sqlite_and_postgresql(sessions):  # noqa: F811  (the fixture imported above)
    """The registry helpers `expert list` uses: current versions in one join, top experts counted in SQL (a
    JSON path on both databases)."""
    with sessions.begin() as session:
        expert = repo.add_expert(session, "medical")
        repo.add_expert_version(session, expert, "/a/v1", "fp", 8, [], {"eval_loss_base": 2.0}, "data")
        repo.add_expert_version(session, expert, "/a/v2", "fp", 8, [], {"eval_loss_base": 1.0}, "data")
        repo.add_request_logs(session, [_log("r1", ["medical"], 1), _log("r2", [], 1), _log("r3", ["base"], 1),
                                        _log("r4", ["medical"], 1, forced="medical"), _log("r5", ["medical"], 9)])
    with sessions() as session:
        assert repo.current_versions(session)["medical"].adapter_path == "/a/v2"
        assert repo.routed_top_experts(session, utcnow() - timedelta(hours=2)) == {"medical": 1, None: 1, "base": 1}
