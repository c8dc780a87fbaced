"""The ingress logic, free of HTTP and of Ray: validate and template a request, route it, pick the pool
that holds its experts, stream the answer, log it, count it. Ray Serve and the tests both drive this."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker
from transformers import PreTrainedTokenizerBase

from api.metrics import Metrics
from api.privacy import loggable_prompt, prompt_hash
from api.schemas import ChatCompletionRequest, CompletionRequest
from core.errors import ExpertNotFoundError, InvalidInputError, MoEError, NotFoundError, PromptTooLongError
from core.settings import Settings
from experts.data import render_prompt, routing_text
from experts.engine import GenerationRequest, SamplingParams, TokenEvent
from registry import repository as repo
from registry.request_log import RequestLogWriter
from router.gate import BASE
from router.service import RoutingService
from serving.route_batcher import RouteBatcher

logger = logging.getLogger(__name__)

GREEDY_BELOW = 1e-6


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

    request: GenerationRequest
    """What the pool generates (its request_id is the response's id)."""
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
    started: float = field(default_factory=time.perf_counter)

    @property
    def request_id(self) -> str:
        return self.request.request_id


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
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.routing = routing
        self.pools = list(pools)
        self.log_writer = log_writer
        self.metrics = metrics or Metrics()
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

    def _sampling(self, body: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
        max_tokens = body.max_tokens or min(self.settings.default_max_tokens, self.settings.max_new_tokens)
        if max_tokens > self.settings.max_new_tokens:
            raise InvalidInputError(
                f"max_tokens={max_tokens} exceeds the limit {self.settings.max_new_tokens} (MOE_MAX_NEW_TOKENS)."
            )
        # Sampling runs in float32: a temperature or top_p below ~1e-38 underflows (NaN probabilities, or a
        # nucleus with no token). Values that small mean "always the top token", so they are greedy.
        greedy = body.temperature < GREEDY_BELOW or body.top_p < GREEDY_BELOW
        return SamplingParams(max_tokens=max_tokens, temperature=0.0 if greedy else body.temperature,
                              top_p=1.0 if greedy else body.top_p, stop=tuple(body.stop or ()), seed=body.seed)

    async def prepare(self, body: ChatCompletionRequest | CompletionRequest) -> Dispatch:
        if isinstance(body, ChatCompletionRequest):
            messages = [m.model_dump() for m in body.messages]
            prompt_text, route_text, endpoint = render_prompt(self.tokenizer, messages), routing_text(messages), "chat"
        else:
            prompt_text, route_text, endpoint = body.prompt, body.prompt, "completions"
        prompt_ids = self._tokens(prompt_text)
        params = self._sampling(body)
        request_id = "req-" + uuid.uuid4().hex
        placement = await self.refresh_placement()
        if body.model == "auto":
            # off the event loop: other requests keep streaming while this one is routed
            decision = await self.route_batcher.route(route_text, None)
            pool = None
            if decision.mixture:
                top = decision.mixture[0][0]
                if top not in placement:  # a just-registered expert: the cached placement may be stale
                    placement = await self.refresh_placement(force=True)
                pool = placement.get(top)
            # Keep the experts that live in the top expert's pool (top-k across pools would need two passes);
            # an expert no pool serves is dropped and the bare backbone answers for its share.
            mixture = [(n, w) for n, w in decision.mixture if pool is not None and placement.get(n) is pool]
            experts, confidence, version, forced = decision.experts, decision.confidence, self.routing.version, None
        elif body.model == BASE:
            mixture, experts, confidence, version, forced = [], [(BASE, 1.0)], None, None, BASE
            pool = None
        else:
            if body.model not in placement:
                placement = await self.refresh_placement(force=True)
            if body.model not in placement:
                raise ExpertNotFoundError(
                    f"The model {body.model!r} does not exist; GET /v1/models lists 'auto' and the experts."
                )
            mixture = experts = [(body.model, 1.0)]
            confidence, version, forced, pool = None, None, body.model, placement[body.model]
        if pool is None:
            pool = self.pools[0]  # bare backbone: any pool serves it
        request = GenerationRequest(prompt_ids, mixture, params, request_id)
        return Dispatch(request, endpoint, body.model, experts, version, confidence, forced, route_text, pool)

    # ---- generating --------------------------------------------------------------------
    async def stream(self, dispatch: Dispatch, coalesce: bool = False) -> AsyncIterator[TokenEvent]:
        """Events from the pool; with `coalesce` (a non-streamed answer) the pool sends one final event carrying
        the whole text. Whatever happens, the request is logged and counted once."""
        last: TokenEvent | None = None
        status, error = 200, None
        try:
            async for event in dispatch.pool.stream(dispatch.request, coalesce):
                last = event
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
            self.record(dispatch, last, status, error)

    async def complete(self, dispatch: Dispatch) -> TokenEvent:
        """The whole answer: the final event, its text the joined completion. A failed generation raises."""
        parts: list[str] = []
        last = TokenEvent(dispatch.request_id, "", None, 0, 0)
        async for event in self.stream(dispatch, coalesce=True):
            parts.append(event.text)
            last = event
        if last.finish_reason == "error":
            raise MoEError(f"Generation failed: {last.error}")
        return replace(last, text="".join(parts))

    def record(self, dispatch: Dispatch, last: TokenEvent | None, status: int, error: str | None) -> None:
        latency_ms = (time.perf_counter() - dispatch.started) * 1000
        prompt_tokens = len(dispatch.request.prompt_ids)
        completion_tokens = last.completion_tokens if last is not None else 0
        self.log_writer.log({
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
        })
        self.metrics.observe_request(
            dispatch.endpoint, dispatch.experts[0][0] if dispatch.experts else BASE, status,
            prompt_tokens, completion_tokens, latency_ms / 1000,
        )

    def _route_many(self, texts: Sequence[str], top_k: int | None):
        self.routing.maybe_refresh()
        return self.routing.route(texts, top_k=top_k)

    async def route_only(self, text: str, top_k: int | None):
        self._tokens(text)
        decision = await self.route_batcher.route(text, top_k)
        self.metrics.observe_route(decision.experts[0][0])
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
