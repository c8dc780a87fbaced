"""Request fidelity without HTTP: the sampler's penalties, logit_bias and logprobs on hand-made logits (batched
rows stay independent), n choices and logprobs through the engine on the tiny random Llama, and the fields the
schemas refuse (400, naming the field), accept or ignore."""

from __future__ import annotations

import asyncio

import pytest
import torch

from api.errors import moe_error_body
from api.request_fields import logit_bias, plain_messages, refuse_unsupported
from api.schemas import ChatCompletionRequest, CompletionRequest, RouteRequest
from core.errors import InvalidInputError, UnsupportedFieldError
from experts.engine import GenerationEngine, GenerationRequest, SamplingParams
from experts.engine.batch import Row
from experts.engine.sampler import MAX_LOGIT, adjust, pick, sample, token_logprobs

VOCAB = 12


def row(prompt=(1, 2), generated=(), seed=None, **params) -> Row:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return Row(GenerationRequest(list(prompt), (), SamplingParams(**params)), lambda e: None, generator,
               generated=list(generated))


# ---- sampler ------------------------------------------------------------------------------


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = torch.zeros(2, VOCAB)
    rows = [row(prompt=(4,), generated=(3, 3, 5), presence_penalty=1.0, frequency_penalty=0.5), row(generated=(3,))]
    out = adjust(logits, rows)
    assert out[0, 3] == pytest.approx(-(1.0 + 2 * 0.5)) and out[0, 5] == pytest.approx(-1.5)
    assert out[0, 4] == 0  # a prompt token: OpenAI's penalties look at the output only
    assert torch.equal(out[1], logits[1])  # the row without penalties is untouched


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0] + [0.0] * (VOCAB - 4)])
    out = adjust(logits, [row(prompt=(0,), generated=(1,), repetition_penalty=2.0)])
    assert out[0, :4].tolist() == [1.0, -4.0, 2.0, -2.0]  # tokens 0 (prompt) and 1 (output) were seen


def test_logit_bias_steers_greedy_and_sampled_rows():
    logits = torch.linspace(0, 1, VOCAB).repeat(3, 1)  # the last token is the argmax
    rows = [row(temperature=0, logit_bias=((2, 100.0),)), row(temperature=0, logit_bias=((VOCAB - 1, -100.0),)),
            row(temperature=1.0, seed=0, logit_bias=((7, 100.0),))]
    assert pick(adjust(logits, rows), rows) == [2, VOCAB - 2, 7]


def test_batched_adjustment_equals_each_row_alone():
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB)
    rows = [row(generated=(1, 1, 2), presence_penalty=0.7, frequency_penalty=-0.3),
            row(prompt=(5, 6), generated=(6,), repetition_penalty=1.3),
            row(logit_bias=((0, 5.0), (9, -3.0))), row()]
    batched = adjust(logits, rows)
    for i, r in enumerate(rows):
        assert torch.allclose(batched[i], adjust(logits[i : i + 1], [r])[0])


def test_extreme_penalties_keep_logits_finite():
    logits = torch.full((1, VOCAB), 50.0)
    r = row(generated=tuple(range(VOCAB)), repetition_penalty=1e-38, temperature=1.0, seed=1)
    out = adjust(logits, [r])
    assert torch.isfinite(out).all() and out.max() <= MAX_LOGIT
    assert 0 <= pick(out, [r])[0] < VOCAB


def test_seeded_rows_sample_the_same_whatever_shares_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB)
    alone = [sample(logits[1:2], [row(seed=42, temperature=0.8, top_p=0.9)]).tokens[0] for _ in range(2)]
    together = sample(logits[[0, 1, 2]], [row(temperature=1.0), row(seed=42, temperature=0.8, top_p=0.9),
                                         row(temperature=0)]).tokens[1]
    assert alone[0] == alone[1] == together


def test_logprobs_are_raw_model_logprobs_sorted_and_sized_per_row():
    torch.manual_seed(2)
    logits = torch.randn(3, VOCAB)
    rows = [row(logprobs=3, temperature=0, logit_bias=((0, 100.0),)), row(), row(logprobs=0, temperature=0)]
    picked = sample(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    chosen, top_ids, top_values = picked.logprobs[0]
    assert picked.tokens[0] == 0  # the bias picked it, but its logprob is the model's, not the biased one
    assert chosen == pytest.approx(float(raw[0, 0]))
    assert top_ids == raw[0].topk(3).indices.tolist() and top_values == sorted(top_values, reverse=True)
    assert all(v <= 0 for v in [chosen, *top_values])
    assert picked.logprobs[1] is None
    assert picked.logprobs[2][1:] == ([], []) and picked.logprobs[2][0] == pytest.approx(float(raw[2].max()))
    assert token_logprobs(logits, [0, 0, 0], [row(), row(), row()]) == [None, None, None]


# ---- the engine: n choices and logprobs ---------------------------------------------------


def test_engine_decodes_n_choices_with_logprobs(backbone, settings):
    engine = GenerationEngine(backbone, settings).start()
    prompt = backbone.tokenizer("tell me", add_special_tokens=False)["input_ids"]
    engine.eos_ids = set()  # random weights: keep the rows going so every choice has tokens

    async def run(params: SamplingParams) -> list:
        request = GenerationRequest(prompt, (), params)
        whole = await engine.complete_all(request)
        streamed = [e async for e in engine.stream(GenerationRequest(prompt, (), params))]
        return [whole, streamed]

    try:
        whole, streamed = asyncio.run(run(SamplingParams(max_tokens=6, temperature=1.0, seed=3, n=3, logprobs=2)))
        again, _ = asyncio.run(run(SamplingParams(max_tokens=6, temperature=1.0, seed=3, n=3, logprobs=2)))
        greedy, _ = asyncio.run(run(SamplingParams(max_tokens=6, temperature=0, n=2)))
    finally:
        engine.stop()
    assert [e.index for e in whole] == [0, 1, 2] and all(e.finish_reason == "length" for e in whole)
    assert [e.text for e in whole] == [e.text for e in again]  # choice k is seeded with seed + k
    assert len({e.text for e in whole}) > 1
    for event in whole:
        assert len(event.logprobs) == event.completion_tokens == 6
        assert all(lp.logprob <= 0 and len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1] for lp in event.logprobs)
    assert {e.index for e in streamed} == {0, 1, 2} and sum(1 for e in streamed if e.finish_reason) == 3
    for k in range(3):  # streamed pieces of a choice carry the logprobs of exactly its tokens
        assert sum(len(e.logprobs) for e in streamed if e.index == k) == 6
    assert greedy[0].text == greedy[1].text and greedy[0].logprobs is None


# ---- schemas: refused, accepted, ignored --------------------------------------------------


def chat_body(**extra) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **extra})


@pytest.mark.parametrize(("extra", "field"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"echo": True}, "echo"),
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3, "n": 2}, "best_of"),
    ({"top_k": 5}, "top_k"),
    ({"guided_json": {"type": "object"}}, "guided_json"),
])
def test_fields_that_would_change_the_answer_are_refused_by_name(extra, field):
    with pytest.raises(UnsupportedFieldError) as caught:
        refuse_unsupported(chat_body(**extra))
    body = moe_error_body(caught.value)
    assert caught.value.status_code == 400 and body["error"]["param"] == field
    assert f"'{field}'" in body["error"]["message"] and body["error"]["code"] == "unsupported_field"


@pytest.mark.parametrize("extra", [
    {"tool_choice": "none"}, {"tools": []}, {"response_format": {"type": "text"}}, {"echo": False},
    {"best_of": 2, "n": 2}, {"seed": 3}, {"top_k": -1}, {"metadata": {"a": "b"}}, {"store": False},
    {"parallel_tool_calls": True}, {"reasoning_effort": "low"}, {"max_tokens": 5, "max_completion_tokens": 5},
])
def test_harmless_values_and_unknown_fields_pass(extra):
    refuse_unsupported(chat_body(**extra))


def test_contradictory_fields_are_400():
    with pytest.raises(InvalidInputError, match="max_completion_tokens"):
        refuse_unsupported(chat_body(max_tokens=5, max_completion_tokens=6))
    with pytest.raises(InvalidInputError, match="logprobs"):
        refuse_unsupported(chat_body(top_logprobs=2))
    assert chat_body(logprobs=True, top_logprobs=2).logprob_count() == 2
    assert chat_body(logprobs=True).logprob_count() == 0 and chat_body().logprob_count() is None


def test_message_content_parts_developer_role_and_null_assistant_content():
    body = chat_body(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "again"},
    ])
    assert plain_messages(body.messages) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "first\nsecond"},
        {"role": "assistant", "content": ""}, {"role": "user", "content": "again"}]
    image = chat_body(messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    with pytest.raises(UnsupportedFieldError, match=r"messages\[0\]\.content\[1\].*'image_url'") as caught:
        plain_messages(image.messages)
    assert caught.value.status_code == 400
    with pytest.raises(ValueError, match="null only in assistant"):
        chat_body(messages=[{"role": "user", "content": None}])
    route = RouteRequest.model_validate({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]})
    assert plain_messages(route.messages)[0]["content"] == "x"


def test_logit_bias_keys_must_be_token_ids():
    assert logit_bias({"3": 1.5, " 7": -100}, 10) == ((3, 1.5), (7, -100.0))
    for key in ("10", "-1", "abc", "²", "9" * 40):
        with pytest.raises(InvalidInputError, match="logit_bias"):
            logit_bias({key: 1.0}, 10)
    with pytest.raises(ValueError):
        chat_body(logit_bias={"3": 101})


def test_completion_prompt_lists_and_logprobs():
    body = CompletionRequest.model_validate({"prompt": ["a", "b"], "logprobs": 2, "n": 2})
    assert body.prompts == ["a", "b"] and body.logprob_count() == 2
    assert CompletionRequest.model_validate({"prompt": "a"}).prompts == ["a"]
    with pytest.raises(ValueError):
        CompletionRequest.model_validate({"prompt": []})
