"""The generation engine: continuous (step-level) batching over the batched multi-LoRA layer.

One background thread owns the model. Each loop iteration it (1) applies adapter commands, (2) admits
waiting requests up to `max_batch_size` and prefills them together, merging their KV cache into the
running batch, and (3) decodes one token for every running row, whatever expert mixture each row uses.
Rows leave the batch as soon as they finish or their client goes away.

The running batch is left-padded: the KV cache is [B, kv_heads, L, head_dim] per layer with a
[B, L] attention mask; each row keeps its own position counter, so padding never shifts positions.
The cache layers keep headroom along L (experts/kv_cache.py), so a decode step writes one column in place
instead of copying the whole cache.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch

from core.device import release_openmp_pool
from core.errors import ExpertNotFoundError, InvalidInputError, OverloadedError
from core.settings import Settings
from experts.adapters import LoraWeights
from experts.backbone import Backbone
from experts.kv_cache import GrowingCache
from experts.multi_lora import Mixture, MultiLoraModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request (OpenAI semantics)."""

    max_tokens: int = 128
    """Most new tokens to generate."""
    temperature: float = 1.0
    """0 = greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; they are not included in the output."""
    seed: int | None = None
    """Per-request sampling seed for reproducible samples."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    mixture: Mixture = ()
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class TokenEvent:
    """A streamed piece of output; the last event of a request has a finish_reason."""

    request_id: str
    text: str
    finish_reason: str | None
    """stop, length, cancelled or error; None while generating."""
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class Completion:
    request_id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


Sink = Callable[[TokenEvent], None]


@dataclass
class _Row:
    request: GenerationRequest
    sink: Sink
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    cancelled: bool = False

    @property
    def position(self) -> int:
        """Position id of the newest token (prompt tokens count from 0)."""
        return len(self.request.prompt_ids) + len(self.generated) - 1


def _joining_sink(on_finish: Callable[[TokenEvent], None]) -> Sink:
    """A sink that joins a request's pieces on the engine thread and hands over only the finish event, its
    text the whole completion: the consumer is woken once per request, not once per token."""
    parts: list[str] = []

    def sink(event: TokenEvent) -> None:
        parts.append(event.text)
        if event.finish_reason is not None:
            event.text = "".join(parts)
            on_finish(event)

    return sink


class GenerationEngine:
    """Continuous-batching generator over one backbone and many LoRA experts."""

    def __init__(self, backbone: Backbone, settings: Settings, multi: MultiLoraModel | None = None) -> None:
        self.backbone = backbone
        self.settings = settings
        self.model = backbone.model
        self.tokenizer = backbone.tokenizer
        self.multi = multi or MultiLoraModel(self.model)
        self.device = backbone.device
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = {e for e in eos_ids if e is not None}
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 8192))
        self._waiting: queue.Queue[_Row] = queue.Queue()
        self._commands: queue.Queue[tuple[Callable[[], None], threading.Event]] = queue.Queue()
        self._rows: list[_Row] = []
        self._by_id: dict[str, _Row] = {}
        self._pending_removals: set[str] = set()
        self._cache: GrowingCache | None = None
        self._mask: torch.Tensor | None = None  # [B, L]
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.stats: dict[str, float] = {"steps": 0, "tokens": 0, "prefills": 0, "rows_max": 0,
                                        "decode_s": 0.0, "decode_tokens": 0, "prefill_s": 0.0}
        """Counters since start; decode_s / decode_tokens give decode throughput without prefill."""

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> GenerationEngine:
        if self._thread is None:
            # From here on the engine thread does the torch work; the caller's OpenMP workers (left from
            # loading the model) would otherwise oversubscribe the cores and slow every step (core.device).
            release_openmp_pool()
            self._thread = threading.Thread(target=self._loop, name="moe-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def load(self) -> dict[str, int]:
        return {"running": len(self._rows), "waiting": self._waiting.qsize()}

    # ---- adapters (applied between steps) ----------------------------------------------
    def _run_command(self, fn: Callable[[], None]) -> None:
        if not self.running:
            fn()
            self._apply_removals()
            return
        done = threading.Event()
        self._commands.put((fn, done))
        done.wait()

    def add_adapter(self, weights: LoraWeights) -> None:
        self._run_command(lambda: self.multi.add_adapter(weights))

    def remove_adapter(self, name: str) -> None:
        """Drop an adapter once no running row uses it: requests in flight always complete."""
        self._run_command(lambda: self._pending_removals.add(name))

    def _apply_removals(self) -> None:
        in_use = {n for row in self._rows for n, _ in row.request.mixture}
        for name in [n for n in self._pending_removals if n not in in_use]:
            self._pending_removals.discard(name)
            if name in self.multi.adapter_names:
                self.multi.remove_adapter(name)

    @property
    def adapter_names(self) -> list[str]:
        return self.multi.adapter_names

    # ---- submitting --------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        known = set(self.multi.adapter_names) - self._pending_removals
        for name, _weight in request.mixture:
            if name not in known:
                raise ExpertNotFoundError(f"Expert {name!r} is not loaded in this pool.")
        if not request.prompt_ids:
            raise InvalidInputError("The prompt is empty.")
        if len(request.prompt_ids) + request.params.max_tokens > self.max_positions:
            raise InvalidInputError(
                f"Prompt ({len(request.prompt_ids)} tokens) plus max_tokens exceeds the model context "
                f"({self.max_positions})."
            )

    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        self.validate(request)
        if self._waiting.qsize() >= self.settings.max_queue:
            raise OverloadedError(
                f"{self._waiting.qsize()} requests are waiting (MOE_MAX_QUEUE={self.settings.max_queue}); retry later."
            )
        generator = None
        if request.params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(request.params.seed)
        row = _Row(request=request, sink=sink, generator=generator)
        self._by_id[request.request_id] = row
        self._waiting.put(row)

    def cancel(self, request_id: str) -> None:
        row = self._by_id.get(request_id)
        if row is not None:
            row.cancelled = True

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Yield events as tokens are produced; leaving early cancels the request."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.submit(request, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        finished = False
        try:
            while True:
                event = await events.get()
                if event.finish_reason is not None:
                    finished = True
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.cancel(request.request_id)

    async def complete(self, request: GenerationRequest) -> TokenEvent:
        """Wait for the whole answer: the finish event, its text the whole completion. The pieces are joined on
        the engine thread and the caller's event loop wakes once per request, not once per token: with 16
        rows decoding, per-token wake-ups put the loop thread on the cores between the decode step's
        OpenMP regions. Cancelling the caller cancels the request."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[TokenEvent] = loop.create_future()

        def resolve(event: TokenEvent) -> None:
            if not done.done():
                done.set_result(event)

        self.submit(request, _joining_sink(lambda event: loop.call_soon_threadsafe(resolve, event)))
        try:
            return await done
        except asyncio.CancelledError:
            self.cancel(request.request_id)
            raise

    async def generate(self, request: GenerationRequest) -> Completion:
        event = await self.complete(request)
        if event.finish_reason == "error":
            raise RuntimeError(event.error or "generation failed")
        return Completion(request.request_id, event.text, event.finish_reason, event.prompt_tokens,
                          event.completion_tokens)

    def generate_many(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Blocking helper for scripts and benchmarks: submit all, wait for all."""
        finals: dict[str, TokenEvent] = {}
        done = threading.Semaphore(0)

        def finished(event: TokenEvent) -> None:
            finals[event.request_id] = event
            done.release()

        self.start()
        for request in requests:
            self.submit(request, _joining_sink(finished))
        for _ in requests:
            done.acquire()
        events = [finals[r.request_id] for r in requests]
        return [Completion(e.request_id, e.text, e.finish_reason or "error", e.prompt_tokens, e.completion_tokens)
                for e in events]

    # ---- the loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        busy = False
        while not self._stopping.is_set():
            if busy and not self._rows:
                release_openmp_pool()  # idle: give the cores' OpenMP threads back (recreated on the next batch)
            busy = bool(self._rows)
            try:
                self._apply_commands()
                self._apply_removals()
                self._drop_cancelled()
                admitted = self._admit()
                if admitted:
                    started = time.perf_counter()
                    self._prefill(admitted)
                    self.stats["prefill_s"] += time.perf_counter() - started
                if self._rows:
                    started = time.perf_counter()
                    rows = len(self._rows)
                    self._decode()
                    self.stats["decode_s"] += time.perf_counter() - started
                    self.stats["decode_tokens"] += rows
            except Exception as exc:  # a failed step fails its rows, never the engine
                logger.exception("Engine step failed")
                for row in self._rows:
                    self._finish(row, "error", error=f"{exc.__class__.__name__}: {exc}")
                self._rows, self._cache, self._mask = [], None, None

    def _apply_commands(self) -> None:
        while True:
            try:
                fn, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            finally:
                done.set()

    def _admit(self) -> list[_Row]:
        capacity = self.settings.max_batch_size - len(self._rows)
        admitted: list[_Row] = []
        if capacity <= 0:
            return admitted
        if not self._rows:
            try:  # idle: block briefly, then give concurrent requests a moment to join the batch
                admitted.append(self._waiting.get(timeout=0.05))
            except queue.Empty:
                return admitted
            deadline = time.perf_counter() + self.settings.batch_wait_ms / 1000
            while len(admitted) < capacity and time.perf_counter() < deadline:
                try:
                    admitted.append(self._waiting.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
        while len(admitted) < capacity:
            try:
                admitted.append(self._waiting.get_nowait())
            except queue.Empty:
                break
        live = []
        loaded = set(self.multi.adapter_names) - self._pending_removals
        for row in admitted:
            missing = [n for n, _ in row.request.mixture if n not in loaded]
            if row.cancelled:
                self._finish(row, "cancelled")
            elif missing:
                self._finish(row, "error", error=f"expert {missing[0]!r} was removed before this request started")
            else:
                live.append(row)
        return live

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: GrowingCache,
                 mixtures: list[Mixture]) -> torch.Tensor:
        with self.multi.routing(mixtures):
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :]  # [B, V]

    def _prefill(self, rows: list[_Row]) -> None:
        length = max(len(r.request.prompt_ids) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            prompt = row.request.prompt_ids
            ids[i, length - len(prompt):] = torch.tensor(prompt)
            mask[i, length - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = GrowingCache()
        logits = self._forward(ids.to(self.device), mask.to(self.device), positions.to(self.device), cache,
                               [r.request.mixture for r in rows])
        self._merge(rows, cache, mask.to(self.device))
        self.stats["prefills"] += 1
        self._emit(rows, logits)

    def _merge(self, rows: list[_Row], cache: GrowingCache, mask: torch.Tensor) -> None:
        if not self._rows or self._cache is None or self._mask is None:
            self._rows, self._cache, self._mask = list(rows), cache, mask
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        length = max(old_len, new_len)

        def left_pad(t: torch.Tensor, dim: int, target: int) -> torch.Tensor:
            if t.shape[dim] == target:
                return t
            shape = list(t.shape)
            shape[dim] = target - t.shape[dim]
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.assign(torch.cat([left_pad(old.keys, 2, length), left_pad(new.keys, 2, length)], dim=0),
                       torch.cat([left_pad(old.values, 2, length), left_pad(new.values, 2, length)], dim=0))
        self._mask = torch.cat([left_pad(self._mask, 1, length), left_pad(mask, 1, length)], dim=0)
        self._rows.extend(rows)

    def _decode(self) -> None:
        rows = self._rows
        ids = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)
        positions = torch.tensor([[r.position] for r in rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        logits = self._forward(ids, self._mask, positions, self._cache, [r.request.mixture for r in rows])
        self.stats["steps"] += 1
        self.stats["rows_max"] = max(self.stats["rows_max"], len(rows))
        self._emit(rows, logits)

    def _sample(self, logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        tokens = []
        for i, row in enumerate(rows):
            params = row.request.params
            if params.temperature <= 0:
                tokens.append(greedy[i])
                continue
            probs = torch.softmax(logits[i].float() / params.temperature, dim=-1)
            if params.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p  # always keeps the top token
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
            tokens.append(int(torch.multinomial(probs, 1, generator=row.generator)))
        return tokens

    def _emit(self, rows: list[_Row], logits: torch.Tensor) -> None:
        finished: list[int] = []
        for index, (row, token) in enumerate(zip(rows, self._sample(logits, rows), strict=True)):
            if row.cancelled:
                self._finish(row, "cancelled")
                finished.append(index)
                continue
            params = row.request.params
            reason = None
            if token in self.eos_ids:
                reason = "stop"
            else:
                row.generated.append(token)
                self.stats["tokens"] += 1
            text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
            for stop in params.stop:
                at = text.find(stop)
                if at != -1:
                    text, reason = text[:at], "stop"
            if reason is None and (
                len(row.generated) >= params.max_tokens or row.position + 1 >= self.max_positions
            ):
                reason = "length"
            visible = text if reason else self._holdback(text, params.stop)
            if len(visible) > row.emitted_chars or reason:
                delta = visible[row.emitted_chars:]
                row.emitted_chars = max(row.emitted_chars, len(visible))
                if reason:
                    self._finish(row, reason, delta)
                    finished.append(index)
                elif delta:
                    row.sink(self._event(row, delta, None))
        if finished:
            self._remove(finished)

    @staticmethod
    def _holdback(text: str, stops: Sequence[str]) -> str:
        """Hide an incomplete UTF-8 tail and any tail that could still become a stop string."""
        text = text.rstrip("\ufffd")
        cut = len(text)
        for stop in stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    cut = min(cut, len(text) - k)
                    break
        return text[:cut]

    def _event(self, row: _Row, text: str, reason: str | None, error: str | None = None) -> TokenEvent:
        return TokenEvent(row.request.request_id, text, reason, len(row.request.prompt_ids), len(row.generated), error)

    def _finish(self, row: _Row, reason: str, text: str = "", error: str | None = None) -> None:
        self._by_id.pop(row.request.request_id, None)
        try:
            row.sink(self._event(row, text, reason, error))
        except Exception:  # a consumer that went away must not stop the engine
            logger.debug("sink of %s failed", row.request.request_id, exc_info=True)

    def _drop_cancelled(self) -> None:
        gone = [i for i, r in enumerate(self._rows) if r.cancelled]
        for i in gone:
            self._finish(self._rows[i], "cancelled")
        if gone:
            self._remove(gone)

    def _remove(self, indices: list[int]) -> None:
        keep = [i for i in range(len(self._rows)) if i not in set(indices)]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0])  # drop columns that are padding for every row left
        for layer in self._cache.layers:
            layer.assign(layer.keys.index_select(0, index)[:, :, start:],
                         layer.values.index_select(0, index)[:, :, start:])
        self._mask = mask[:, start:]
        self._rows = [self._rows[i] for i in keep]
