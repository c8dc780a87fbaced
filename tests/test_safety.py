"""Hostile input and safe artifacts: archive checks before extraction, pickles refused, redaction and
hash-only logging, body limits on declared and chunked bodies, odd strings never a 5xx."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import pytest
from pydantic import SecretStr

from api.privacy import loggable_prompt, redact
from core.errors import AdapterValidationError
from core.settings import Settings
from experts.backbone import load_backbone
from pipelines.archive import unpack_adapter_archive
from registry import repository as repo
from tests.conftest import tiny_settings
from tests.test_api import chat, running_service


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_backbone_dir):
    """One in-process service for the module: these tests only read, or add what nothing else looks at."""
    config = tiny_settings(tmp_path_factory.mktemp("safety") / "home", tiny_backbone_dir)
    with running_service(config, load_backbone(config)) as running:
        yield running


GOOD = {"adapter_config.json": b'{"peft_type": "LORA"}', "adapter_model.safetensors": b"x" * 10}


def _tar(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_good_archives_unpack(tmp_path):
    folder = unpack_adapter_archive(_tar({f"my-adapter/{k}": v for k, v in GOOD.items()}), tmp_path / "a", 1 << 20)
    assert sorted(p.name for p in folder.iterdir()) == sorted(GOOD)
    assert unpack_adapter_archive(_zip(GOOD), tmp_path / "b", 1 << 20).is_dir()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (_tar({**GOOD, "../../etc/evil.json": b"{}"}), "unsafe path"),
        (_tar({**GOOD, "/abs/adapter_config.json": b"{}"}), "unsafe path"),
        (_tar({**GOOD, "adapter_model.bin": b"pickle"}), "not part of a LoRA adapter"),
        (_tar(GOOD, links={"README.md": "/etc/passwd"}), "link"),
        (_tar({"a/b/c/adapter_config.json": b"{}"}), "nested too deep"),
        (_tar({"adapter_config.json": b"{}"}), "lacks"),
        (_zip({**GOOD, "..\\evil.json": b"{}"}), "unsafe path"),
        (_tar({**GOOD, "adapter_model.safetensors": b"x" * 5000}), "more than"),
        (b"not an archive at all", "not a .zip"),
    ],
)
def test_bad_archives_are_refused_before_writing(tmp_path, data, needle):
    with pytest.raises(AdapterValidationError, match=needle):
        unpack_adapter_archive(data, tmp_path / "out", 4096)
    assert not (tmp_path / "out").exists()


def test_redaction_and_hash_only():
    text = "Mail me at jane.doe@example.com or call +1 (415) 555-0134, card 4111111111111111."
    cleaned = redact(text)
    assert "jane" not in cleaned and "555" not in cleaned and "4111" not in cleaned
    assert "[EMAIL]" in cleaned and "[PHONE]" in cleaned
    assert loggable_prompt(text, Settings(log_hash_only=True)) is None
    assert loggable_prompt(text, Settings(log_redact=True)) == cleaned
    assert loggable_prompt(text, Settings()) == text


HOSTILE = [
    "'; DROP TABLE request_logs; --",
    "../../../../etc/passwd",
    "\u202e\u0000\ufeffnull\u0000byte",
    "𝕳𝖊𝖑𝖑𝖔 👩‍⚕️ 🏳️‍🌈 \U0010ffff",
    "a" * 3000,
    "<script>alert(1)</script> {{7*7}} ${jndi:ldap://x}",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_prompts_never_5xx(service, text):
    client, _, _ = service
    for path, body in (
        ("/v1/chat/completions", {"model": "auto", "max_tokens": 2, "messages": [{"role": "user", "content": text}]}),
        ("/v1/completions", {"model": "medical", "max_tokens": 2, "prompt": text}),
        ("/v1/route", {"text": text}),
        ("/v1/feedback", {"request_id": text[:64], "rating": 1}),
    ):
        response = client.post(path, json=body)
        assert response.status_code < 500, (path, response.text)


MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        # found by tests/test_fuzz.py: each was a 500 before
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "top_p": 5e-324}, 200),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "temperature": 1e-300}, 200),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "temperature": 1e-300, "stream": True}, 200),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "seed": 2**70}, 422),
        ("/admin/routers/99999999999999999999/promote", None, 422),
        # unicode edge cases: lone surrogates, NUL, bidi overrides, odd JSON values
        ("/v1/completions", b'{"prompt": "\\ud800 fever", "max_tokens": 2}', 422),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\x00\u202e"}], "max_tokens": 2}, 200),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 422),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}', 422),
        ("/v1/chat/completions", b"\xff\xfe\x00", 400),
        ("/v1/chat/completions", b"[]", 422),
        ("/v1/route", {"messages": [{"role": "system", "content": "no user turn"}]}, 200),
        ("/v1/feedback", {"request_id": "\x00", "rating": 1}, 404),
        ("/admin/experts/..%2F..%2Fetc/retire", None, 404),
        ("/admin/experts", {"name": "../../etc", "adapter_path": "/etc"}, 400),
    ],
)
def test_hostile_bodies_are_4xx_or_answered(service, path, body, status):
    client, _, _ = service
    headers = {"Authorization": "Bearer admin-secret", "Content-Type": "application/json"}
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = client.post(path, headers=headers, **kwargs)
    assert response.status_code == status, response.text
    if status != 200:
        assert response.json()["error"]["message"]


def test_prompts_with_nul_are_logged(service):
    client, gateway, sessions = service
    answer = chat(client, messages=[{"role": "user", "content": "drop\x00table"}]).json()
    gateway.log_writer.flush()
    with sessions() as session:
        assert repo.get_request_log(session, answer["id"]).prompt == "drop\ufffdtable"


def test_upload_endpoint_checks_then_registers(service, tmp_path):
    client, _, _ = service
    auth = {"Authorization": "Bearer admin-secret", "Content-Type": "application/octet-stream"}
    evil = _tar({**GOOD, "../x.json": b"{}"})
    response = client.post("/admin/experts/uploaded/upload", headers=auth, content=evil)
    assert response.status_code == 400 and "unsafe path" in response.json()["error"]["message"]
    chunked = client.post("/v1/chat/completions", headers={"Content-Type": "application/json"},
                          content=iter([b'{"model": "auto", "messages": [' + b" " * 1_100_000, b"]}"]))
    assert chunked.status_code == 413


def test_admin_token_is_never_logged(service, caplog):
    client, _, _ = service
    client.get("/admin/experts", headers={"Authorization": "Bearer admin-secret"})
    client.get("/admin/experts", headers={"Authorization": "Bearer wrong-token"})
    assert "admin-secret" not in caplog.text and "wrong-token" not in caplog.text
    assert json.dumps(chat(client).json()).find("admin-secret") == -1


def test_api_keys_guard_query_endpoints_when_set(service):
    client, gateway, _ = service
    gateway.settings.api_keys = [SecretStr("key-one"), SecretStr("key-two")]
    try:
        body = {"text": "my knee hurts"}
        assert client.post("/v1/route", json=body).status_code == 401
        assert client.post("/v1/route", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.post("/v1/route", json=body, headers={"Authorization": "Basic key-one"}).status_code == 401
        for key in ("key-one", "key-two", "admin-secret"):  # the admin token also opens the query endpoints
            assert client.post("/v1/route", json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert client.get("/healthz").status_code == 200  # probes stay open
        # an API key is not an admin token
        assert client.get("/admin/experts", headers={"Authorization": "Bearer key-one"}).status_code == 403
    finally:
        gateway.settings.api_keys = []
