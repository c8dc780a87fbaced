"""Request fidelity end to end with the official `openai` client: the app over an in-process pool of the tiny
random Llama (no Ray), served by uvicorn on 127.0.0.1, driven with every supported request field: n,
max_completion_tokens, logprobs/top_logprobs (chat) and logprobs (completions), penalties, logit_bias, seed,
stream_options.include_usage, content parts, the developer role, prompt lists, user, and the 400 refusals.

The model's weights are random, so the checks are about shapes, counts and invariants, not about text. Every
request biases the end-of-turn token down (logit_bias) so that each choice runs to its token limit."""

from __future__ import annotations

import threading
import time

import openai
import pytest
import uvicorn
from pydantic import SecretStr

from api.app import create_app
from experts.backbone import load_backbone
from registry import repository as repo
from tests.conftest import tiny_settings
from tests.live_service import free_port
from tests.test_api import running_service

pytestmark = pytest.mark.integration

KEY = "client-test-key"
MESSAGES = [{"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "I have a bad headache"},
                                         {"type": "text", "text": "and a fever"}]},
            {"role": "assistant", "content": None},
            {"role": "user", "content": "what should I take?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_backbone_dir):
    config = tiny_settings(tmp_path_factory.mktemp("openai-client") / "home", tiny_backbone_dir)
    config.api_keys = [SecretStr(KEY)]
    with running_service(config, load_backbone(config)) as (_, gateway, sessions):
        port = free_port()
        web = uvicorn.Server(uvicorn.Config(create_app(lambda: gateway), host="127.0.0.1", port=port,
                                            log_level="warning", lifespan="off"))
        thread = threading.Thread(target=web.run, name="uvicorn", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not web.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert web.started, "uvicorn did not start"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
        no_eos = {str(gateway.tokenizer.eos_token_id): -100}
        try:
            yield client, gateway, sessions, no_eos
        finally:
            web.should_exit = True
            thread.join(timeout=10)


def assert_chat_logprobs(logprobs, tokens: int, top: int) -> None:
    assert len(logprobs.content) == tokens
    for entry in logprobs.content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode("utf-8"))
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == top and values == sorted(values, reverse=True) and all(v <= 0 for v in values)


def test_chat_n_logprobs_penalties_seed_and_user(server):
    client, gateway, sessions, no_eos = server
    common = {"model": "medical", "messages": MESSAGES, "max_completion_tokens": 5, "n": 3, "temperature": 0.9,
              "seed": 11, "logprobs": True, "top_logprobs": 3, "presence_penalty": 0.5, "frequency_penalty": 0.5,
              "logit_bias": no_eos, "user": "alice", "extra_body": {"repetition_penalty": 1.2}}
    answer = client.chat.completions.create(**common)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in answer.choices)
    assert answer.usage.completion_tokens == 15
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 15
    for choice in answer.choices:
        assert_chat_logprobs(choice.logprobs, tokens=5, top=3)
    again = client.chat.completions.create(**common)  # seeded: the same three choices
    assert [c.message.content for c in again.choices] == [c.message.content for c in answer.choices]

    greedy = client.chat.completions.create(model="medical", messages=MESSAGES, max_completion_tokens=4, n=2,
                                            temperature=0, logit_bias=no_eos)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    assert greedy.choices[0].logprobs is None and greedy.usage.completion_tokens == 8

    forced = 7  # a +100 bias makes greedy decoding emit that token every step
    only = client.chat.completions.create(model="auto", messages=MESSAGES, max_completion_tokens=3, temperature=0,
                                          logprobs=True, logit_bias={str(forced): 100})
    assert {e.token for e in only.choices[0].logprobs.content} == {gateway.tokenizer.decode([forced])}

    gateway.log_writer.flush()
    with sessions() as session:
        row = repo.get_request_log(session, answer.id)
    assert row is not None and row.completion_tokens == 15 and row.user == "alice"


def test_chat_stream_n_logprobs_and_include_usage(server):
    client, _, _, no_eos = server
    chunks = list(client.chat.completions.create(
        model="finance", messages=MESSAGES, max_completion_tokens=4, n=2, temperature=0.7, logprobs=True,
        top_logprobs=2, logit_bias=no_eos, stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 8
    assert all(c.usage is None for c in body)
    for index in (0, 1):
        mine = [c.choices[0] for c in body if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]
        entries = [e for c in mine if c.logprobs for e in c.logprobs.content]
        assert len(entries) == 4 and all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries)
    plain = list(client.chat.completions.create(model="finance", messages=MESSAGES, max_tokens=3, stream=True,
                                                logit_bias=no_eos))
    assert plain[-1].choices[0].finish_reason == "length" and plain[-1].usage.completion_tokens == 3


def test_completions_prompt_list_n_and_logprobs(server):
    client, _, _, no_eos = server
    answer = client.completions.create(model="medical", prompt=["fever and", "my order"], n=2, max_tokens=4,
                                       logprobs=2, temperature=0.8, logit_bias=no_eos)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3] and answer.usage.completion_tokens == 16
    for choice in answer.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
        assert all(v <= 0 for v in lp.token_logprobs)
        assert all(1 <= len(top) <= 3 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]

    chunks = list(client.completions.create(model="medical", prompt="fever and", max_tokens=3, logprobs=1,
                                            logit_bias=no_eos, stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 3
    tokens = [t for c in body if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert len(tokens) == 3 and body[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize(("call", "field"), [
    (lambda c: c.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], tools=[
        {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]), "tools"),
    (lambda c: c.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}],
                                         response_format={"type": "json_object"}), "response_format"),
    (lambda c: c.chat.completions.create(model="auto", messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is in it"}, {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]),
     "image_url"),
    (lambda c: c.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=4, max_completion_tokens=5), "max_completion_tokens"),
    (lambda c: c.completions.create(model="auto", prompt="hi", echo=True), "echo"),
    (lambda c: c.completions.create(model="auto", prompt="hi", best_of=3), "best_of"),
])
def test_unsupported_fields_are_400_naming_the_field(server, call, field):
    client = server[0]
    with pytest.raises(openai.BadRequestError, match=field) as caught:
        call(client)
    assert caught.value.status_code == 400
