"""The continuous-batching engine: greedy output equals transformers' generate (bare and with a peft
adapter) whatever else shares the batch; sampling, stop strings, limits, cancellation, streaming."""

from __future__ import annotations

import asyncio
import copy
import threading
import time

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from core.errors import ExpertNotFoundError, OverloadedError
from experts.adapters import load_lora_weights
from experts.engine import GenerationEngine, GenerationRequest, SamplingParams
from experts.engine.attention import DECODE_ATTENTION, grouped_decode_attention
from experts.engine.batch import GROUP_PADDING, row_groups


@pytest.fixture
def adapter_dir(backbone, tmp_path):
    torch.manual_seed(5)
    model = get_peft_model(
        copy.deepcopy(backbone.model),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "ad", safe_serialization=True)
    return tmp_path / "ad"


def _prompts(backbone, texts):
    tok = backbone.tokenizer
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _hf_greedy(model, prompt, n, eos):
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )
    generated = out[0, len(prompt):].tolist()
    return generated[: generated.index(eos)] if eos in generated else generated


def test_greedy_matches_generate_in_a_mixed_batch(backbone, settings, adapter_dir):
    reference = copy.deepcopy(backbone.model)
    peft_reference = PeftModel.from_pretrained(copy.deepcopy(backbone.model), adapter_dir)
    eos = backbone.tokenizer.eos_token_id
    prompts = _prompts(backbone, ["my order never arrived", "headache and fever since", "roth ira or", "hi"])
    engine = GenerationEngine(backbone, settings)
    engine.add_adapter(load_lora_weights(adapter_dir, "ad"))
    params = SamplingParams(max_tokens=12, temperature=0)
    mixtures = [[], [("ad", 1.0)], [], [("ad", 1.0)]]
    requests = [GenerationRequest(p, m, params) for p, m in zip(prompts, mixtures, strict=True)]
    try:
        results = engine.generate_many(requests)
    finally:
        engine.stop()
    tok = backbone.tokenizer
    for prompt, mixture, result in zip(prompts, mixtures, results, strict=True):
        model = peft_reference if mixture else reference
        expected = tok.decode(_hf_greedy(model, prompt, 12, eos), skip_special_tokens=True)
        assert result.text == expected
        assert result.prompt_tokens == len(prompt)
        assert result.finish_reason in ("stop", "length")


def test_rows_joining_a_running_batch_match_solo_runs(backbone, settings):
    """Continuous batching: requests arriving while others decode give the same greedy text as alone."""
    prompts = _prompts(backbone, ["a", "the quick brown fox jumps", "please reset my password", "what dose"])
    params = SamplingParams(max_tokens=10, temperature=0)
    engine = GenerationEngine(backbone, settings).start()
    try:
        solo = [engine.generate_many([GenerationRequest(p, (), params)])[0].text for p in prompts]

        async def staggered():
            async def one(i, p):
                await asyncio.sleep(0.01 * i)
                return (await engine.generate(GenerationRequest(p, (), params))).text

            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

        together = asyncio.run(staggered())
    finally:
        engine.stop()
    assert together == solo


def test_prefill_groups_bound_the_padding_computed():
    """Admitted rows prefill in passes of similar prompt length, shortest first, each pass computing at most
    PREFILL_PADDING x its real positions (a lone long prompt gets its own pass)."""
    from types import SimpleNamespace

    from experts.engine.scheduler import PREFILL_PADDING, prefill_groups

    lengths = [160, 90, 295, 98, 45, 73, 66, 49, 62, 46, 78, 39, 37, 45, 37, 45]  # bench.cpu_anchor's 16 prompts
    rows = [SimpleNamespace(request=SimpleNamespace(prompt_ids=[0] * n)) for n in lengths]
    groups = prefill_groups(rows)
    sizes = [[len(r.request.prompt_ids) for r in group] for group in groups]
    assert sizes == [[37, 37, 39, 45, 45, 45, 46, 49], [62, 66, 73, 78, 90], [98, 160], [295]]
    assert sorted(id(r) for group in groups for r in group) == sorted(id(r) for r in rows)
    for group in sizes:
        assert max(group) * len(group) <= PREFILL_PADDING * sum(group)
    assert sum(max(g) * len(g) for g in sizes) == 1457  # one left-padded pass: 16 x 295 = 4720
    assert len(prefill_groups(rows[4:5] * 3)) == 1  # equal lengths: one pass
    assert len(prefill_groups(rows, max_padding=float("inf"))) == 1


def test_prompts_of_mixed_lengths_prefill_apart_and_decode_together(backbone, settings):
    """One admission of short and long prompts takes several prefill passes, then decodes as one batch; every
    row's greedy text is what it is alone."""
    from experts.engine.request import joining_sink

    texts = ["hi", "reset my password", " ".join(["the quick brown fox jumps over the lazy dog"] * 6), "a b"]
    prompts = _prompts(backbone, texts)
    params = SamplingParams(max_tokens=8, temperature=0)
    engine = GenerationEngine(backbone, settings).start()
    try:
        solo = [engine.generate_many([GenerationRequest(p, (), params)])[0].text for p in prompts]
    finally:
        engine.stop()
    engine = GenerationEngine(backbone, settings)
    finals: dict[str, str] = {}
    requests = [GenerationRequest(p, (), params) for p in prompts]
    for request in requests:  # all queued before the engine starts: one admission
        engine.submit(request, joining_sink(lambda event: finals.__setitem__(event.request_id, event.text)))
    engine.start()
    try:
        deadline = time.monotonic() + 60
        while len(finals) < len(requests) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert [finals[r.request_id] for r in requests] == solo
    assert engine.stats["prefills"] >= 2 and engine.stats["rows_max"] == len(prompts)
    assert backbone.model.config._attn_implementation == DECODE_ATTENTION  # decode steps attended per row group


def test_a_failed_prefill_pass_fails_its_admission_and_the_engine_serves_on(backbone, settings, monkeypatch):
    """When one prefill pass of an admission fails, every row of that admission finishes with an error (rows of
    passes never run included: nothing would finish them otherwise), and the next request is served."""
    from experts.engine.request import joining_sink

    engine = GenerationEngine(backbone, settings)
    forward = engine._forward

    def failing_on_long_prompts(ids, *args):
        if ids.shape[1] > 20:
            raise RuntimeError("prefill broke")
        return forward(ids, *args)

    monkeypatch.setattr(engine, "_forward", failing_on_long_prompts)
    texts = ["hi", "a b", " ".join(["the quick brown fox jumps over the lazy dog"] * 4)]
    finals: dict[str, object] = {}
    requests = [GenerationRequest(p, (), SamplingParams(max_tokens=4, temperature=0))
                for p in _prompts(backbone, texts)]
    for request in requests:  # one admission: the short prompts' pass runs first, the long one's fails
        engine.submit(request, joining_sink(lambda event: finals.__setitem__(event.request_id, event)))
    engine.start()
    try:
        deadline = time.monotonic() + 60
        while len(finals) < len(requests) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [finals[r.request_id].finish_reason for r in requests] == ["error"] * 3
        assert "prefill broke" in finals[requests[2].request_id].error
        after = engine.generate_many([GenerationRequest(_prompts(backbone, ["hello"])[0], (),
                                                        SamplingParams(max_tokens=3, temperature=0))])
    finally:
        engine.stop()
    assert after[0].finish_reason == "length" and after[0].completion_tokens == 3


def test_row_groups_bound_the_padding_attended():
    """Consecutive rows share one attention call while their columns x rows stay within GROUP_PADDING x the real
    columns they attend; a row far shorter than its neighbours starts a group of its own."""
    assert row_groups([0, 0, 0], 10) == [(0, 3, 0)]
    assert row_groups([5], 10) == [(0, 1, 5)]
    assert row_groups([0, 9, 0], 10) == [(0, 1, 0), (1, 2, 9), (2, 3, 0)]
    starts = [295 - n for n in (37, 37, 39, 45, 45, 45, 46, 49, 62, 66, 73, 78, 90, 98, 160, 295)]
    groups = row_groups(starts, 295)
    assert len(groups) >= 2 and groups[-1][1:] == (16, 0)
    assert sum((end - first) * (295 - column) for first, end, column in groups) < 0.5 * 16 * 295
    for first, end, column in groups:
        real = sum(295 - s for s in starts[first:end])
        assert column == min(starts[first:end]) and (295 - column) * (end - first) <= GROUP_PADDING * real
    assert [r for first, end, _ in groups for r in range(first, end)] == list(range(16))


def test_grouped_decode_attention_equals_sdpa_over_the_whole_batch():
    """One query row per sequence over a left-padded cache: attending per row group gives SDPA's output over the
    whole padded batch; other passes (prefill, one row, no mask) are SDPA itself."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(3)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    rows, length = 6, 40
    query, key, value = torch.randn(rows, 9, 1, 16), torch.randn(rows, 3, length, 16), torch.randn(rows, 3, length, 16)
    mask = torch.zeros(rows, 1, 1, length, dtype=torch.bool)
    for row, start in enumerate([30, 31, 28, 0, 12, 35]):
        mask[row, ..., start:] = True
    expected, _ = sdpa_attention_forward(module, query, key, value, mask)
    grouped, _ = grouped_decode_attention(module, query, key, value, mask)
    assert len(row_groups(mask[:, 0, -1].int().argmax(-1).tolist(), length)) > 1
    torch.testing.assert_close(grouped, expected, rtol=0, atol=1e-6)
    prefill_query = torch.randn(rows, 9, 4, 16)
    prefill_mask = torch.ones(rows, 1, 4, length, dtype=torch.bool)
    torch.testing.assert_close(grouped_decode_attention(module, prefill_query, key, value, prefill_mask)[0],
                               sdpa_attention_forward(module, prefill_query, key, value, prefill_mask)[0])


def test_sampling_seed_stop_and_length(backbone, settings):
    engine = GenerationEngine(backbone, settings).start()
    prompt = _prompts(backbone, ["tell me"])[0]
    try:
        a, b, _ = engine.generate_many(
            [GenerationRequest(prompt, (), SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7))
             for _ in range(2)] + [GenerationRequest(prompt, (), SamplingParams(max_tokens=8, temperature=1.0, seed=8))]
        )
        assert a.text == b.text  # same seed, same sample
        assert a.completion_tokens <= 8
        long = engine.generate_many([GenerationRequest(prompt, (), SamplingParams(max_tokens=5, temperature=0))])[0]
        if long.finish_reason == "length":
            assert long.completion_tokens == 5
        if len(long.text) > 2:
            stop = long.text[1:3]
            cut = engine.generate_many(
                [GenerationRequest(prompt, (), SamplingParams(max_tokens=5, temperature=0, stop=(stop,)))]
            )[0]
            assert cut.finish_reason == "stop"
            assert stop not in cut.text
            assert long.text.startswith(cut.text)
    finally:
        engine.stop()


def test_stream_cancel_and_errors(backbone, settings):
    engine = GenerationEngine(backbone, settings).start()
    prompt = _prompts(backbone, ["stream me"])[0]

    async def consume_then_leave():
        events = []
        request = GenerationRequest(prompt, (), SamplingParams(max_tokens=60, temperature=0))
        async for event in engine.stream(request):
            events.append(event)
            if len(events) == 2:
                break
        return request.request_id, events

    try:
        _, events = asyncio.run(consume_then_leave())
        assert len(events) == 2
        deadline = 50
        while engine.load()["running"] and deadline:
            asyncio.run(asyncio.sleep(0.02))
            deadline -= 1
        assert engine.load()["running"] == 0  # the cancelled row left the batch
        with pytest.raises(ExpertNotFoundError):
            engine.submit(GenerationRequest(prompt, [("nope", 1.0)]), lambda e: None)
    finally:
        engine.stop()

    later = GenerationEngine(backbone, settings)  # not started yet: the request waits in the queue

    async def wait_then_cancel():
        """complete() (one loop wake-up per answer) cancels its request when the awaiting task is cancelled."""
        task = asyncio.create_task(later.complete(GenerationRequest(prompt, (), SamplingParams(max_tokens=60,
                                                                                              temperature=0))))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(wait_then_cancel())
    later.start()
    try:  # FIFO: by the time this one is done the cancelled one was dropped, or it would have decoded beside it
        after = later.generate_many([GenerationRequest(prompt, (), SamplingParams(max_tokens=4, temperature=0))])[0]
        assert later.stats["tokens"] == after.completion_tokens > 0
    finally:
        later.stop()
    settings.max_queue = 1
    idle = GenerationEngine(backbone, settings)  # not started: the queue fills up
    idle.submit(GenerationRequest(prompt), lambda e: None)
    with pytest.raises(OverloadedError):
        idle.submit(GenerationRequest(prompt), lambda e: None)


def test_removing_an_adapter_waits_for_requests_in_flight(backbone, settings, adapter_dir):
    engine = GenerationEngine(backbone, settings)
    engine.add_adapter(load_lora_weights(adapter_dir, "ad"))
    engine.start()
    prompt = _prompts(backbone, ["a long answer please"])[0]

    async def scenario():
        request = GenerationRequest(prompt, [("ad", 1.0)], SamplingParams(max_tokens=30, temperature=0))
        stream = engine.stream(request)
        first = await anext(stream)
        await asyncio.to_thread(engine.remove_adapter, "ad")  # retired while the request runs
        rest = [event async for event in stream]
        return [first, *rest]

    try:
        engine.eos_ids = set()
        events = asyncio.run(scenario())
        assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 30
        deadline = 100
        while "ad" in engine.adapter_names and deadline:
            asyncio.run(asyncio.sleep(0.02))
            deadline -= 1
        assert engine.adapter_names == []
        with pytest.raises(ExpertNotFoundError):
            engine.submit(GenerationRequest(prompt, [("ad", 1.0)]), lambda e: None)
    finally:
        engine.stop()


def test_engine_thread_is_the_only_openmp_pool(backbone, settings, monkeypatch):
    """The caller's OpenMP workers are released when the engine starts, and the engine's own when its batch
    drains, so an idle engine never oversubscribes the cores for another thread (core.device)."""
    import experts.engine.core as engine_module

    calls: list[str] = []
    monkeypatch.setattr(engine_module, "release_openmp_pool",
                        lambda: calls.append(threading.current_thread().name) or True)
    engine = GenerationEngine(backbone, settings).start()
    try:
        assert calls == [threading.current_thread().name]
        ids = backbone.tokenizer("hello there")["input_ids"]
        engine.generate_many([GenerationRequest(ids, (), SamplingParams(max_tokens=3, temperature=0))])
        deadline = time.monotonic() + 5
        while "moe-engine" not in calls and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # a few idle polls of the loop (50 ms each)
        assert calls.count("moe-engine") == 1  # once per drained batch, not on every idle poll
    finally:
        engine.stop()


def test_release_openmp_pool_keeps_torch_working():
    from core.device import release_openmp_pool

    x = torch.randn(256, 256)
    expected = x @ x
    released = release_openmp_pool()
    assert isinstance(released, bool)
    torch.testing.assert_close(x @ x, expected)  # the pool is recreated on the next parallel op
    if not released:
        pytest.skip("no GNU OpenMP runtime with omp_pause_resource_all in this torch build")
