"""The LoRA training loop: loss on response tokens only, length-grouped batches with dynamic padding
(no tokens wasted on a fixed length), AdamW with warm-up and cosine decay, a progress bar."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from experts.data import TokenizedExample
from experts.quant import refuse_quantized

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters of one expert's LoRA training run."""

    epochs: int = 3
    """Passes over the training examples."""
    batch_size: int = 8
    """Examples per optimizer step."""
    learning_rate: float = 3e-4
    """Peak AdamW learning rate (after warm-up)."""
    warmup_ratio: float = 0.1
    """Fraction of steps with a linear warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights."""
    max_length: int = 384
    """Longest example in tokens; longer responses are cut, longer prompts skipped."""
    seed: int = 0
    """Shuffling and dropout seed."""
    max_steps: int | None = None
    """Stop after this many steps (smoke tests); None = all epochs."""
    keep_best_epoch: bool = True
    """Score the held-out set after every epoch and keep the weights of the best epoch (early stopping)."""


@dataclass
class TrainResult:
    """What `train_lora` leaves behind."""

    losses: list[float]
    """Mean training loss of every step."""
    held_out: float | None
    """`on_epoch`'s held-out loss of the weights the model holds now (the kept epoch's); None without on_epoch."""


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L], right-padded
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], -100 on prompt and padding

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels[:, 1:] != -100).sum())


def collate(examples: Sequence[TokenizedExample], pad_id: int, device: torch.device) -> Batch:
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return Batch(ids.to(device), mask.to(device), labels.to(device))


def length_grouped_batches(
    examples: Sequence[TokenizedExample], batch_size: int, rng: random.Random | None
) -> list[list[TokenizedExample]]:
    """Sort by length so a batch pads little, then shuffle the batch order (and the pool) when training."""
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
        # sort within windows of 8 batches: keeps randomness across epochs, padding stays small
        window = batch_size * 8
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda j: len(examples[j].input_ids))
        ]
    else:
        order.sort(key=lambda j: len(examples[j].input_ids))
    batches = [[examples[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The transformer body and the LM head of a (peft-wrapped) causal LM, when its logits are a plain
    projection (no soft-capping or scaling), else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    if not hasattr(base, "get_decoder") or base.get_output_embeddings() is None:
        return None
    return base.get_decoder(), base.get_output_embeddings()


def batch_nll(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over target tokens, and their count.

    The LM head (hidden x vocab, the largest matmul for a small model) runs only on the positions that are
    scored, not on prompt and padding positions: same loss, less compute and memory."""
    targets = batch.labels[:, 1:]  # [B, L-1]
    scored = targets != -100
    parts = _decoder_and_head(model)
    if parts is None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][scored]
    else:
        decoder, head = parts
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        logits = head(hidden[:, :-1][scored])  # [M, V] for the M scored positions
    loss = torch.nn.functional.cross_entropy(logits.float(), targets[scored], reduction="sum")
    return loss, int(scored.sum())


@torch.no_grad()
def mean_nll(
    model: torch.nn.Module, examples: Sequence[TokenizedExample], pad_id: int, batch_size: int = 8
) -> float:
    """Token-weighted mean NLL of the responses (nats/token)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for group in length_grouped_batches(examples, batch_size, rng=None):
        loss, n = batch_nll(model, collate(group, pad_id, device))
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _total_steps(config: TrainConfig, examples: int) -> int:
    total = math.ceil(examples / config.batch_size) * config.epochs
    return total if config.max_steps is None else min(total, config.max_steps)


def _warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                   warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to a tenth of the peak learning rate."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def _restore(params: Sequence[torch.nn.Parameter], state: dict[int, torch.Tensor]) -> None:
    with torch.no_grad():
        for p in params:
            p.copy_(state[id(p)])


def _optimizer_step(model: torch.nn.Module, batch: Batch, params: list[torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer, scheduler) -> tuple[float, int]:
    """One clipped AdamW step on a collated batch; returns (mean token loss, target tokens)."""
    loss_sum, count = batch_nll(model, batch)
    loss = loss_sum / max(count, 1)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()), count


def train_lora(
    model: torch.nn.Module,
    train: Sequence[TokenizedExample],
    config: TrainConfig,
    pad_id: int,
    on_step: Callable[[int, float, int], None] | None = None,
    on_epoch: Callable[[int], float] | None = None,
) -> TrainResult:
    """Train the trainable (LoRA) parameters of `model`; returns the per-step mean loss and the held-out loss
    of the final weights.

    `on_epoch(epoch)` returns a held-out loss; with `config.keep_best_epoch` the trainable weights of the
    epoch with the lowest one are restored at the end (small domain sets overfit after a few epochs)."""
    refuse_quantized(model)  # experts learn on the full-precision backbone, whatever serves them
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters; wrap it with a LoRA config first")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = _total_steps(config, len(train))
    scheduler = _warmup_cosine(optimizer, total_steps, config.warmup_ratio)
    model.train()
    losses: list[float] = []
    step = 0
    best_loss, best_state, kept_loss = math.inf, None, None
    with tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True) as bar:
        for epoch in range(config.epochs):
            for group in length_grouped_batches(train, config.batch_size, rng):
                if step >= total_steps:
                    break
                loss, count = _optimizer_step(model, collate(group, pad_id, device), params, optimizer, scheduler)
                losses.append(loss)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if on_step is not None:
                    on_step(step, losses[-1], count)
            if on_epoch is not None:
                held_out = kept_loss = on_epoch(epoch + 1)
                if held_out < best_loss:
                    best_loss = held_out
                    if config.keep_best_epoch and epoch + 1 < config.epochs:
                        best_state = {id(p): p.detach().clone() for p in params}
                    else:
                        best_state = None  # the current weights are the best
            if step >= total_steps:
                break
    if best_state is not None:
        logger.info("Keeping the best epoch's weights (held-out loss %.4f)", best_loss)
        _restore(params, best_state)
        kept_loss = best_loss
    model.eval()
    return TrainResult(losses, kept_loss)
