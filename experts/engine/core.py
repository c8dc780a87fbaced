"""The generation engine: continuous (step-level) batching over the batched multi-LoRA layer.

One background thread owns the model. Each loop iteration it (1) applies adapter commands, (2) admits
waiting requests up to `max_batch_size` (scheduler.py) and prefills them in passes of similar prompt length,
merging their KV cache into the running batch (batch.py), and (3) decodes one token for every running row,
whatever expert mixture each row uses, samples (sampler.py) and turns tokens into text deltas (output.py). Rows
leave the batch as soon as they finish or their client goes away.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING

import torch

from core.device import release_openmp_pool
from core.errors import ExpertNotFoundError, InvalidInputError
from experts.engine.attention import use_grouped_decode_attention
from experts.engine.batch import Row, RunningBatch, left_padded
from experts.engine.output import OutputProcessor
from experts.engine.request import Completion, GenerationRequest, RowTiming, Sink, TokenEvent, joining_sink
from experts.engine.sampler import sample
from experts.engine.scheduler import Scheduler, prefill_groups
from experts.kv_cache import GrowingCache
from experts.multi_lora import Mixture, MultiLoraModel
from experts.quant import resolve_quant

if TYPE_CHECKING:  # annotations only: importable without pydantic-settings (bench.gpu_check on a bare GPU box)
    from core.settings import Settings
    from experts.adapters import LoraWeights
    from experts.backbone import Backbone

logger = logging.getLogger(__name__)


class GenerationEngine:
    """Continuous-batching generator over one backbone and many LoRA experts."""

    def __init__(self, backbone: Backbone, settings: Settings, multi: MultiLoraModel | None = None) -> None:
        self.backbone = backbone
        self.settings = settings
        self.model = backbone.model
        self.tokenizer = backbone.tokenizer
        self.device = backbone.device
        # low-bit copies of the linear layers for this engine's passes (CPU); the fp32 weights stay for the rest
        self.multi = multi or MultiLoraModel(self.model, quant=resolve_quant(settings.backbone_quant, self.device))
        if self.device.type == "cpu" and self.model.config._attn_implementation == "sdpa":
            use_grouped_decode_attention(self.model)  # decode steps skip most of the batch's left padding
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = {e for e in eos_ids if e is not None}
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 8192))
        self.scheduler = Scheduler(settings)
        self.batch = RunningBatch()
        self.output = OutputProcessor(self.tokenizer, self.max_positions)
        self._commands: queue.Queue[tuple[Callable[[], None], threading.Event]] = queue.Queue()
        self._by_id: dict[str, list[Row]] = {}
        """Each request's rows (its n choices) that have not finished yet."""
        self._pending_removals: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.stats: dict[str, float] = {"steps": 0, "tokens": 0, "prefills": 0, "rows_max": 0,
                                        "decode_s": 0.0, "decode_tokens": 0, "prefill_s": 0.0}
        """Counters since start; decode_s / decode_tokens give decode throughput without prefill."""
        self.step_rows: Counter[int] = Counter()
        """Decode steps by batch size (rows), since start: the pool's batch-size histogram reads it."""

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
        return {"running": len(self.batch), "waiting": len(self.scheduler)}

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
        in_use = {n for row in self.batch.rows for n, _ in row.request.mixture}
        for name in [n for n in self._pending_removals if n not in in_use]:
            self._pending_removals.discard(name)
            if name in self.multi.adapter_names:
                self.multi.remove_adapter(name)

    @property
    def adapter_names(self) -> list[str]:
        return self.multi.adapter_names

    def _servable(self) -> set[str]:
        """Adapters a new request may use: loaded and not waiting for removal."""
        return set(self.multi.adapter_names) - self._pending_removals

    # ---- submitting (any thread) -------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        known = self._servable()
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

    def _generator(self, seed: int | None, choice: int) -> torch.Generator | None:
        """Choice k of a seeded request draws from seed + k: the n choices differ and each is reproducible."""
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed if choice == 0 else (seed + choice) % 2**64)

    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        """Queue the request's n rows together, so they are admitted into the same batch when there is room."""
        self.validate(request)
        self.scheduler.check_room(request.params.n)
        rows = [Row(request=request, sink=sink, generator=self._generator(request.params.seed, k), index=k)
                for k in range(request.params.n)]
        self._by_id[request.request_id] = rows
        for row in rows:
            self.scheduler.add(row)

    def cancel(self, request_id: str) -> None:
        for row in self._by_id.get(request_id, []):
            row.cancelled = True

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Yield events as tokens are produced (the n choices interleaved, told apart by `index`) until every
        choice has finished; leaving early cancels the request."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.submit(request, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        running = request.params.n
        try:
            while running:
                event = await events.get()
                if event.finish_reason is not None:
                    running -= 1
                yield event
        finally:
            if running:
                self.cancel(request.request_id)

    async def complete(self, request: GenerationRequest) -> TokenEvent:
        """The whole answer of a one-choice request (see complete_all)."""
        return (await self.complete_all(request))[0]

    async def complete_all(self, request: GenerationRequest) -> list[TokenEvent]:
        """Wait for the whole answer: each choice's finish event, its text the whole completion, in index order.
        The pieces are joined on the engine thread and the caller's event loop wakes once per choice, not once
        per token: with 16 rows decoding, per-token wake-ups put the loop thread on the cores between the
        decode step's OpenMP regions. Cancelling the caller cancels the request."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[TokenEvent]] = loop.create_future()
        finals: dict[int, TokenEvent] = {}

        def resolve(event: TokenEvent) -> None:
            finals[event.index] = event
            if len(finals) == request.params.n and not done.done():
                done.set_result([finals[k] for k in sorted(finals)])

        self.submit(request, joining_sink(lambda event: loop.call_soon_threadsafe(resolve, event)))
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
            self.submit(request, joining_sink(finished))
        for _ in requests:
            done.acquire()
        events = [finals[r.request_id] for r in requests]
        return [Completion(e.request_id, e.text, e.finish_reason or "error", e.prompt_tokens, e.completion_tokens)
                for e in events]

    # ---- the loop (engine thread) ------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        busy = False
        while not self._stopping.is_set():
            if busy and not self.batch.rows:
                release_openmp_pool()  # idle: give the cores' OpenMP threads back (recreated on the next batch)
            busy = bool(self.batch.rows)
            try:
                self._step()
            except Exception as exc:  # a failed step fails its rows, never the engine
                logger.exception("Engine step failed")
                for row in self.batch.rows:
                    self._finish(row, "error", error=f"{exc.__class__.__name__}: {exc}")
                self.batch.clear()

    def _step(self) -> None:
        self._apply_commands()
        self._apply_removals()
        self._drop_cancelled()
        admitted = self._admit()
        if admitted:
            started = time.perf_counter()
            try:
                for group in prefill_groups(admitted):  # similar prompt lengths per pass: little padding computed
                    self._prefill(group)
            except Exception as exc:
                self._fail_unmerged(admitted, exc)
                raise  # the loop fails the running batch, as for any failed step
            self.stats["prefill_s"] += time.perf_counter() - started
        if self.batch.rows:
            started = time.perf_counter()
            rows = len(self.batch)
            self._decode()
            self.stats["decode_s"] += time.perf_counter() - started
            self.stats["decode_tokens"] += rows

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

    def _admit(self) -> list[Row]:
        """Admitted rows that can still run: cancelled ones, or ones whose expert went away, finish here."""
        admitted = self.scheduler.admit(len(self.batch))
        live = []
        loaded = self._servable()
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
        """ids/positions [B, T], mask [B, L] -> logits of the last position [B, V]; writes T columns of cache."""
        with self.multi.routing(mixtures):
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :]

    def _prefill(self, rows: list[Row]) -> None:
        ids, mask, positions = left_padded([r.request.prompt_ids for r in rows], self.tokenizer.pad_token_id)
        cache = GrowingCache()
        started = time.perf_counter()
        for row in rows:
            row.admitted = started
        logits = self._forward(ids.to(self.device), mask.to(self.device), positions.to(self.device), cache,
                               [r.request.mixture for r in rows])
        self.batch.merge(rows, cache, mask.to(self.device))
        self.stats["prefills"] += 1
        sampled = time.perf_counter()
        for row in rows:
            row.first_token = sampled
        self._emit(rows, logits)

    def _decode(self) -> None:
        rows = self.batch.rows
        ids = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)  # [B, 1]
        positions = torch.tensor([[r.position] for r in rows], device=self.device)  # [B, 1]
        mask = self.batch.grow_mask()
        logits = self._forward(ids, mask, positions, self.batch.cache, [r.request.mixture for r in rows])
        self.stats["steps"] += 1
        self.stats["rows_max"] = max(self.stats["rows_max"], len(rows))
        self.step_rows[len(rows)] += 1
        self._emit(rows, logits)

    def _emit(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Sample one token per row (logits [B, V]), send the new text, and retire finished rows."""
        finished: list[int] = []
        sampled = sample(logits, rows)
        for index, (row, token, logprob) in enumerate(zip(rows, sampled.tokens, sampled.logprobs, strict=True)):
            if row.cancelled:
                self._finish(row, "cancelled")
                finished.append(index)
                continue
            eos = token in self.eos_ids
            if not eos:
                row.generated.append(token)
                self.stats["tokens"] += 1
                if logprob is not None:
                    row.pending_logprobs.append(self.output.token_logprob(token, *logprob))
            delta, reason = self.output.process(row, eos)
            if reason:
                self._finish(row, reason, delta)
                finished.append(index)
            elif delta:
                row.sink(self._event(row, delta, None))
        if finished:
            self.batch.remove(finished)

    def _event(self, row: Row, text: str, reason: str | None, error: str | None = None) -> TokenEvent:
        logprobs = None
        if row.request.params.logprobs is not None:  # the tokens since the row's last event, held-back ones too
            logprobs, row.pending_logprobs = row.pending_logprobs, []
        return TokenEvent(row.request.request_id, text, reason, len(row.request.prompt_ids), len(row.generated),
                          error, row.index, logprobs, None if reason is None else self._timing(row))

    @staticmethod
    def _timing(row: Row) -> RowTiming:
        now = time.perf_counter()
        admitted = now if row.admitted is None else row.admitted
        return RowTiming(admitted - row.submitted, None if row.first_token is None else now - row.first_token)

    def _finish(self, row: Row, reason: str, text: str = "", error: str | None = None) -> None:
        request_id = row.request.request_id
        left = [r for r in self._by_id.get(request_id, []) if r is not row]
        if left:
            self._by_id[request_id] = left
        else:
            self._by_id.pop(request_id, None)
        try:
            row.sink(self._event(row, text, reason, error))
        except Exception:  # a consumer that went away must not stop the engine
            logger.debug("sink of %s failed", row.request.request_id, exc_info=True)

    def _fail_unmerged(self, admitted: list[Row], exc: Exception) -> None:
        """Finish the admitted rows that a failed prefill left outside the batch: nothing else would."""
        merged = {id(row) for row in self.batch.rows}
        for row in admitted:
            if id(row) not in merged:
                self._finish(row, "error", error=f"{exc.__class__.__name__}: {exc}")

    def _drop_cancelled(self) -> None:
        gone = [i for i, r in enumerate(self.batch.rows) if r.cancelled]
        for i in gone:
            self._finish(self.batch.rows[i], "cancelled")
        if gone:
            self.batch.remove(gone)
