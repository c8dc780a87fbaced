"""The ingress logic, free of HTTP and of Ray: validate and template a request, route it, pick the pool
that holds its experts, stream the answer, log it, count it. Ray Serve and the tests both drive this."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker
from transformers import PreTrainedTokenizerBase

from api.metrics import Metrics
from api.privacy import loggable_prompt, prompt_hash
from api.request_fields import logit_bias, plain_messages, refuse_unsupported
from api.schemas import ChatCompletionRequest, CompletionRequest
from core.errors import ExpertNotFoundError, InvalidInputError, MoEError, NotFoundError, PromptTooLongError
from core.settings import Settings
from experts.data import render_prompt, routing_text
from experts.engine import GenerationRequest, SamplingParams, TokenEvent, TokenLogprob
from experts.multi_lora import Mixture
from registry import repository as repo
from registry.request_log import RequestLogWriter
from router.gate import BASE
from router.service import RoutingService
from serving import tracing
from serving.metrics import LocalExport, MetricsExport
from serving.route_batcher import RouteBatcher

logger = logging.getLogger(__name__)

GREEDY_BELOW = 1e-6
# The request log keeps the OpenAI `user` once the registry has the column (migration 0002); before that the
# row must not carry the key, or the database refuses the whole row.


class PoolClient(Protocol):
    """A place that generates: an ExpertPool deployment handle, or an in-process engine in tests."""

    name: str

    def stream(self, request: GenerationRequest, coalesce: bool = False) -> AsyncIterator[TokenEvent]:
        """The request's events, the last one with a finish_reason; with `coalesce` only that one, its text the
        whole completion."""
        ...

    async def experts(self) -> list[str]: ...


@dataclass
class Dispatch:
    """A validated request, ready to generate."""

    requests: list[GenerationRequest]
    """What the pool generates: one request per prompt (a completions prompt list has several), each with n
    choices; choice `p * n + k` is choice k of prompt p. The first request's id is the response's id."""
    endpoint: str
    model: str
    experts: list[tuple[str, float]]
    """What the response reports (may include 'base')."""
    router_version: int | None
    confidence: float | None
    forced: str | None
    route_text: str
    """The user text the router read; this (not the templated prompt) is what the log keeps."""
    pool: PoolClient
    user: str | None = None
    started: float = field(default_factory=time.perf_counter)
    span: Any = None
    """The request's trace span (None without tracing), ended when the request is recorded."""

    @property
    def request_id(self) -> str:
        return self.requests[0].request_id

    @property
    def n(self) -> int:
        return self.requests[0].params.n

    @property
    def choices(self) -> int:
        return len(self.requests) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_ids) for r in self.requests)


class Gateway:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        tokenizer: PreTrainedTokenizerBase,
        routing: RoutingService,
        pools: Sequence[PoolClient],
        log_writer: RequestLogWriter,
        metrics: Metrics | None = None,
        export: MetricsExport | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.routing = routing
        self.pools = list(pools)
        self.log_writer = log_writer
        self.metrics = metrics or Metrics()
        self.metrics.follow(lambda: self.routing.version, lambda: {
            "written": log_writer.written, "spilled": log_writer.spilled, "replayed": log_writer.replayed,
            "rejected": log_writer.rejected})
        self.export = export or LocalExport(self.metrics.registry)
        """What GET /metrics serves: this process's series, or (under Ray) the totals of every replica."""
        # concurrent routed requests share one truncated-backbone pass (off the event loop)
        self.route_batcher = RouteBatcher(self._route_many)
        self._placement: dict[str, PoolClient] = {}
        self._placement_at = 0.0

    # ---- placement ---------------------------------------------------------------------
    async def refresh_placement(self, force: bool = False) -> dict[str, PoolClient]:
        if force or time.monotonic() - self._placement_at > 2.0:
            placement: dict[str, PoolClient] = {}
            for pool in self.pools:
                try:
                    names = await pool.experts()
                except Exception as exc:  # a dead or restarting replica: keep what it served, requests retry
                    logger.warning("Pool %s did not list its experts (%s); using the last known placement",
                                   pool.name, exc.__class__.__name__)
                    names = [n for n, p in self._placement.items() if p is pool]
                for name in names:
                    placement.setdefault(name, pool)
            self._placement, self._placement_at = placement, time.monotonic()
        return self._placement

    # ---- preparing ---------------------------------------------------------------------
    def _tokens(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.settings.max_prompt_tokens:
            raise PromptTooLongError(
                f"The prompt has {len(ids)} tokens; the limit is {self.settings.max_prompt_tokens} "
                "(MOE_MAX_PROMPT_TOKENS)."
            )
        return ids

    def _sampling(self, body: ChatCompletionRequest | CompletionRequest, prompts: int) -> SamplingParams:
        name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        asked = body.max_completion_tokens or body.max_tokens
        max_tokens = asked or min(self.settings.default_max_tokens, self.settings.max_new_tokens)
        if max_tokens > self.settings.max_new_tokens:
            raise InvalidInputError(
                f"{name}={max_tokens} exceeds the limit {self.settings.max_new_tokens} (MOE_MAX_NEW_TOKENS).",
                param=name)
        if body.n * prompts > self.settings.max_batch_size:  # the choices must fit one batch of the engine
            raise InvalidInputError(
                f"n={body.n} x {prompts} prompt(s) asks for more choices than one batch holds "
                f"({self.settings.max_batch_size}, MOE_MAX_BATCH_SIZE).", param="n")
        # Sampling runs in float32: a temperature or top_p below ~1e-38 underflows (NaN probabilities, or a
        # nucleus with no token). Values that small mean "always the top token", so they are greedy.
        greedy = body.temperature < GREEDY_BELOW or body.top_p < GREEDY_BELOW
        return SamplingParams(
            max_tokens=max_tokens, temperature=0.0 if greedy else body.temperature,
            top_p=1.0 if greedy else body.top_p, stop=tuple(body.stop or ()), seed=body.seed, n=body.n,
            logprobs=body.logprob_count(), presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
            logit_bias=logit_bias(body.logit_bias, len(self.tokenizer)),
        )

    def _inputs(self, body: ChatCompletionRequest | CompletionRequest) -> tuple[list[list[int]], str, str]:
        """(token ids of each prompt, the text the router reads, the endpoint name)."""
        if isinstance(body, ChatCompletionRequest):
            messages = plain_messages(body.messages)
            return [self._tokens(render_prompt(self.tokenizer, messages))], routing_text(messages), "chat"
        # a prompt list is routed as one text: the response has one `moe` object, so one mixture for all
        return [self._tokens(p) for p in body.prompts], "\n\n".join(body.prompts), "completions"

    async def _decide(self, model: str, route_text: str, endpoint: str) -> tuple[
            Mixture, list[tuple[str, float]], float | None, int | None, str | None, PoolClient]:
        """(mixture, experts reported, confidence, router version, forced expert, pool) for `model`."""
        placement = await self.refresh_placement()
        if model == "auto":
            # off the event loop: other requests keep streaming while this one is routed
            decision = await self.route_batcher.route(route_text, None)
            self.metrics.observe_decision(endpoint, decision.experts[0][0], decision.confidence, decision.abstained)
            pool = None
            if decision.mixture:
                top = decision.mixture[0][0]
                if top not in placement:  # a just-registered expert: the cached placement may be stale
                    placement = await self.refresh_placement(force=True)
                pool = placement.get(top)
            # Keep the experts that live in the top expert's pool (top-k across pools would need two passes);
            # an expert no pool serves is dropped and the bare backbone answers for its share.
            mixture = [(n, w) for n, w in decision.mixture if pool is not None and placement.get(n) is pool]
            return (mixture, decision.experts, decision.confidence, self.routing.version, None,
                    self.pools[0] if pool is None else pool)  # bare backbone: any pool serves it
        if model == BASE:
            return [], [(BASE, 1.0)], None, None, BASE, self.pools[0]
        if model not in placement:
            placement = await self.refresh_placement(force=True)
        if model not in placement:
            raise ExpertNotFoundError(
                f"The model {model!r} does not exist; GET /v1/models lists 'auto' and the experts."
            )
        return [(model, 1.0)], [(model, 1.0)], None, None, model, placement[model]

    async def prepare(self, body: ChatCompletionRequest | CompletionRequest) -> Dispatch:
        refuse_unsupported(body)
        prompt_ids, route_text, endpoint = self._inputs(body)
        params = self._sampling(body, len(prompt_ids))
        request_id = "req-" + uuid.uuid4().hex
        span = tracing.start_span("moe.request", request_id=request_id, endpoint=endpoint, model=body.model)
        route = tracing.start_span("moe.route", span, model=body.model)
        try:
            mixture, experts, confidence, version, forced, pool = await self._decide(body.model, route_text, endpoint)
        except MoEError as exc:
            tracing.end_span(route, exc.message)
            tracing.end_span(span, exc.message, status=exc.status_code)
            raise
        tracing.end_span(route, expert=experts[0][0] if experts else BASE, confidence=confidence,
                         router_version=version, forced=forced is not None, pool=pool.name)
        trace = tracing.headers(span)
        requests = [GenerationRequest(ids, mixture, params, request_id if p == 0 else f"{request_id}-{p}", trace)
                    for p, ids in enumerate(prompt_ids)]
        return Dispatch(requests, endpoint, body.model, experts, version, confidence, forced, route_text, pool,
                        body.user, span=span)

    # ---- generating --------------------------------------------------------------------
    async def _events(self, dispatch: Dispatch, coalesce: bool) -> AsyncIterator[TokenEvent]:
        """The pool's events for every prompt of the dispatch, each re-indexed to its choice in the response."""
        if len(dispatch.requests) == 1:
            async for event in dispatch.pool.stream(dispatch.requests[0], coalesce):
                yield event
            return
        merged: asyncio.Queue[TokenEvent | BaseException | None] = asyncio.Queue()

        async def pump(position: int, request: GenerationRequest) -> None:
            try:
                async for event in dispatch.pool.stream(request, coalesce):
                    merged.put_nowait(replace(event, index=position * dispatch.n + event.index))
            except Exception as exc:  # re-raised in the consumer, where the gateway logs and maps it
                merged.put_nowait(exc)
            finally:
                merged.put_nowait(None)

        tasks = [asyncio.create_task(pump(p, r)) for p, r in enumerate(dispatch.requests)]
        try:
            running = len(tasks)
            while running:
                item = await merged.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:  # the client left or a prompt failed: the other prompts' rows are cancelled too
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def stream(self, dispatch: Dispatch, coalesce: bool = False) -> AsyncIterator[TokenEvent]:
        """Events from the pool, choices interleaved (`index`); with `coalesce` (a non-streamed answer) the pool
        sends one final event per choice carrying its whole text. Whatever happens, the request is logged and
        counted once."""
        latest: dict[int, TokenEvent] = {}
        finals: list[tuple[TokenEvent, float]] = []
        status, error = 200, None
        try:
            async for event in self._events(dispatch, coalesce):
                latest[event.index] = event
                if event.finish_reason is not None:  # when it arrived, for time to first token
                    finals.append((event, time.perf_counter() - dispatch.started))
                if event.finish_reason == "error":
                    status, error = 500, event.error
                yield event
        except MoEError as exc:
            status, error = exc.status_code, exc.message
            exc.request_id = dispatch.request_id  # logged under this id: the error response names it
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the client went away: logged as 499
            status, error = 499, "client disconnected"
            raise
        except BaseException as exc:  # pool failure: still logged
            status, error = 500, repr(exc)
            raise
        finally:
            self.record(dispatch, sum(e.completion_tokens for e in latest.values()), status, error, finals)

    async def complete(self, dispatch: Dispatch) -> list[TokenEvent]:
        """The whole answer: each choice's final event in index order, its text (and logprobs) the joined
        completion. A failed generation raises."""
        parts: dict[int, list[str]] = {}
        logprobs: dict[int, list[TokenLogprob]] = {}
        finals: dict[int, TokenEvent] = {}
        async for event in self.stream(dispatch, coalesce=True):
            parts.setdefault(event.index, []).append(event.text)
            if event.logprobs is not None:
                logprobs.setdefault(event.index, []).extend(event.logprobs)
            if event.finish_reason is not None:
                finals[event.index] = event
        failed = [e for e in finals.values() if e.finish_reason == "error"]
        if failed or len(finals) < dispatch.choices:
            raise MoEError(f"Generation failed: {failed[0].error if failed else 'a choice did not finish'}")
        return [replace(finals[i], text="".join(parts[i]), logprobs=logprobs.get(i, finals[i].logprobs))
                for i in sorted(finals)]

    def record(self, dispatch: Dispatch, completion_tokens: int, status: int, error: str | None,
               finals: Sequence[tuple[TokenEvent, float]] = ()) -> None:
        latency_ms = (time.perf_counter() - dispatch.started) * 1000
        prompt_tokens = dispatch.prompt_tokens
        row = {
            "request_id": dispatch.request_id,
            "endpoint": dispatch.endpoint,
            "model": dispatch.model,
            "forced_expert": dispatch.forced,
            "experts": [{"name": n, "weight": round(w, 4)} for n, w in dispatch.experts],
            "router_version": dispatch.router_version,
            "confidence": dispatch.confidence,
            "prompt": loggable_prompt(dispatch.route_text, self.settings),
            "prompt_hash": prompt_hash(dispatch.route_text),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "latency_ms": latency_ms,
            "status_code": status,
            "error": error,
            "user": dispatch.user,
        }
        self.log_writer.log(row)
        tracing.end_span(dispatch.span, error, status=status, prompt_tokens=prompt_tokens,
                         completion_tokens=completion_tokens)
        self.metrics.observe_request(
            dispatch.endpoint, dispatch.experts[0][0] if dispatch.experts else BASE,
            "routed" if dispatch.forced is None else "forced", status, prompt_tokens, completion_tokens,
            latency_ms / 1000, finals,
        )

    def _route_many(self, texts: Sequence[str], top_k: int | None):
        self.routing.maybe_refresh()
        return self.routing.route(texts, top_k=top_k)

    async def route_only(self, text: str, top_k: int | None):
        self._tokens(text)
        decision = await self.route_batcher.route(text, top_k)
        self.metrics.observe_decision("route", decision.experts[0][0], decision.confidence, decision.abstained)
        return decision

    def feedback(self, request_id: str, expert: str | None, rating: float | None) -> int:
        if expert is None and rating is None:
            raise InvalidInputError("Send 'expert', 'rating', or both.")
        self.log_writer.flush()  # the request may still sit in the log queue
        with self.sessions.begin() as session:
            if repo.get_request_log(session, request_id) is None:
                raise NotFoundError(f"Request {request_id!r} is not in the request log.")
            if expert is not None and expert != BASE and repo.get_expert(session, expert) is None:
                raise ExpertNotFoundError(f"Expert {expert!r} does not exist.")
            return repo.add_feedback(session, request_id, expert, rating).id
