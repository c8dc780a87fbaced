"""Verb: train a LoRA expert from domain data, track it in MLflow, save it as safetensors, register it.

`moe expert add NAME --data FILE` runs this. Everything is validated before any training starts, and
nothing is registered unless training and saving succeeded.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import torch
from peft import LoraConfig, get_peft_model
from sqlalchemy.orm import Session, sessionmaker

from core.errors import DataFormatError
from core.settings import Settings
from experts.adapters import lora_config_from_settings, validate_expert_name, write_metadata
from experts.backbone import Backbone
from experts.data import MIN_EXAMPLES, ChatExample, load_examples, load_texts, tokenize_example
from experts.seed import split_examples, split_texts
from experts.training import TrainConfig, mean_nll, train_lora
from pipelines.plots import save_loss_curve
from pipelines.tracking import mlflow_run
from registry import repository as repo
from registry.models import ExpertStatus

logger = logging.getLogger(__name__)



@dataclass
class ExpertTrainingResult:
    name: str
    version: int | None
    adapter_path: str
    base_loss: float
    """Held-out mean response NLL of the bare backbone (nats/token)."""
    expert_loss: float
    """Held-out mean response NLL with the trained adapter."""
    steps: int
    seconds: float
    run_id: str | None
    n_train: int
    n_val: int

    @property
    def reduction(self) -> float:
        return 1.0 - self.expert_loss / self.base_loss if self.base_loss else 0.0

    @property
    def warning(self) -> str | None:
        """Set when the expert does not beat the bare backbone on its own held-out split: routing to it would
        make answers worse than no expert at all."""
        if self.expert_loss < self.base_loss:
            return None
        return (f"expert {self.name} is not better than the bare backbone on its held-out split (answer NLL "
                f"{self.expert_loss:.3f} vs {self.base_loss:.3f}); check the data (real answers in the domain, "
                "not one house style) or train with other --epochs, or retire it with `moe expert retire "
                f"{self.name}`")


def _tokenize_all(backbone: Backbone, examples: Sequence[ChatExample], max_length: int):
    tokenized = [tokenize_example(backbone.tokenizer, e, max_length) for e in examples]
    kept = [t for t in tokenized if t is not None]
    if len(kept) < len(tokenized):
        logger.warning("Skipped %d examples whose prompt exceeds %d tokens", len(tokenized) - len(kept), max_length)
    return kept


def train_adapter(
    settings: Settings,
    backbone: Backbone,
    name: str,
    train: Sequence[ChatExample],
    val: Sequence[ChatExample],
    output_dir: Path,
    config: TrainConfig,
    save_dtype: torch.dtype | None = None,
    on_progress: Callable[[float, str], None] | None = None,
) -> ExpertTrainingResult:
    """Train one adapter on the backbone and save it to `output_dir` (logs into the active MLflow run)."""
    started = time.perf_counter()
    pad_id = backbone.tokenizer.pad_token_id
    train_tok = _tokenize_all(backbone, train, config.max_length)
    val_tok = _tokenize_all(backbone, val, config.max_length)
    if not train_tok or not val_tok:
        raise DataFormatError("No usable training or validation examples after tokenization.")
    lora = lora_config_from_settings(settings)
    mlflow.log_params({
        "expert": name, "backbone": backbone.name, "backbone_fingerprint": backbone.fingerprint,
        "lora_rank": lora.r, "lora_alpha": lora.lora_alpha, "target_modules": ",".join(sorted(lora.target_modules)),
        "n_train": len(train_tok), "n_val": len(val_tok), **{f"train_{k}": v for k, v in asdict(config).items()},
    })
    logger.info("Evaluating the bare backbone on %d held-out examples", len(val_tok))
    base_loss = mean_nll(backbone.model, val_tok, pad_id)
    mlflow.log_metric("eval_loss_base", base_loss)
    losses, expert_loss = _fit_and_save(backbone, lora, name, train_tok, val_tok, base_loss, output_dir, config,
                                        save_dtype, on_progress)
    result = ExpertTrainingResult(
        name=name, version=None, adapter_path=str(output_dir), base_loss=base_loss, expert_loss=expert_loss,
        steps=len(losses), seconds=time.perf_counter() - started, run_id=None, n_train=len(train_tok),
        n_val=len(val_tok),
    )
    _record(backbone, result, losses, output_dir)
    return result


def _fit_and_save(backbone: Backbone, lora: LoraConfig, name: str, train_tok: list, val_tok: list, base_loss: float,
                  output_dir: Path, config: TrainConfig, save_dtype: torch.dtype | None,
                  on_progress: Callable[[float, str], None] | None) -> tuple[list[float], float]:
    """LoRA on the shared backbone, saved to `output_dir`; the backbone is restored exactly afterwards.
    Returns (per-step training losses, held-out loss of the kept epoch)."""
    pad_id = backbone.tokenizer.pad_token_id
    peft_model = get_peft_model(backbone.model, lora)
    try:
        peft_model.print_trainable_parameters = lambda: None  # keep stdout clean
        total = max(1, (len(train_tok) + config.batch_size - 1) // config.batch_size * config.epochs)

        def on_step(step: int, loss: float, tokens: int) -> None:
            mlflow.log_metric("train_loss", loss, step=step, synchronous=False)
            if on_progress is not None:
                on_progress(min(step / total, 1.0), f"step {step}/{total} loss {loss:.3f}")

        def on_epoch(epoch: int) -> float:
            loss = mean_nll(peft_model, val_tok, pad_id)
            mlflow.log_metric("eval_loss_epoch", loss, step=epoch)
            logger.info("%s: epoch %d held-out loss %.4f (base %.4f)", name, epoch, loss, base_loss)
            return loss

        trained = train_lora(peft_model, train_tok, config, pad_id, on_step=on_step,
                             on_epoch=on_epoch if config.epochs > 1 else None)
        # The kept epoch was already scored; a second held-out pass would take minutes on a CPU.
        expert_loss = trained.held_out if trained.held_out is not None else mean_nll(peft_model, val_tok, pad_id)
        mlflow.log_metrics({"eval_loss_expert": expert_loss, "eval_loss_reduction": 1 - expert_loss / base_loss})
        output_dir.mkdir(parents=True, exist_ok=True)
        if save_dtype is not None:
            for param in peft_model.parameters():
                if param.requires_grad:
                    param.data = param.data.to(save_dtype)
        peft_model.save_pretrained(str(output_dir), safe_serialization=True)
        (output_dir / "README.md").unlink(missing_ok=True)  # peft's generated model card says nothing here
    finally:
        # Restore the shared backbone exactly (removes the LoRA layers) for whoever uses it next.
        backbone.model = peft_model.unload()
        backbone.model.requires_grad_(False)
        backbone.model.to(backbone.dtype)
    return trained.losses, expert_loss


def _record(backbone: Backbone, result: ExpertTrainingResult, losses: list[float], output_dir: Path) -> None:
    """metadata.json beside the adapter, the loss curve and the adapter in MLflow, the summary (and the
    not-better-than-the-backbone warning) in the log."""
    write_metadata(output_dir, {
        "name": result.name, "backbone": backbone.name, "backbone_fingerprint": backbone.fingerprint,
        "eval_loss_base": result.base_loss, "eval_loss_expert": result.expert_loss, "n_train": result.n_train,
        "n_val": result.n_val,
    })
    with tempfile.TemporaryDirectory() as tmp:
        curve = save_loss_curve(losses, Path(tmp) / "loss_curve.png", title=f"{result.name}: training loss")
        mlflow.log_artifact(str(curve))
    mlflow.log_artifacts(str(output_dir), artifact_path="adapter")
    logger.info(
        "%s: held-out loss %.3f -> %.3f (%.0f%% lower) in %d steps, %.0f s",
        result.name, result.base_loss, result.expert_loss, 100 * result.reduction, result.steps, result.seconds,
    )
    if result.warning:
        logger.warning(result.warning)
        mlflow.set_tag("warning", "not better than the bare backbone")


def register_expert(
    session: Session,
    *,
    name: str,
    description: str,
    adapter_path: str,
    backbone: Backbone,
    rank: int,
    target_modules: list[str],
    metrics: dict,
    source: str,
    routing_train: Sequence[str],
    routing_val: Sequence[str],
    run_id: str | None,
    status: ExpertStatus = ExpertStatus.ACTIVE,
) -> int:
    """Add an expert, its first version and its routing prompts (train and validation) to the registry."""
    expert = repo.add_expert(session, name, description, status=status)
    version = repo.add_expert_version(
        session, expert, adapter_path, backbone.fingerprint, rank, target_modules, metrics, source, run_id
    )
    repo.add_routing_examples(session, name, routing_train, "train", source)
    repo.add_routing_examples(session, name, routing_val, "val", source)
    return version.version


def train_expert_from_file(
    settings: Settings,
    backbone: Backbone,
    sessions: sessionmaker[Session],
    name: str,
    data: Path,
    description: str = "",
    config: TrainConfig | None = None,
    on_progress: Callable[[float, str], None] | None = None,
    prompts: Path | None = None,
) -> ExpertTrainingResult:
    """`moe expert add NAME --data FILE [--prompts FILE]`: validate everything, train, track, save, register.
    The data's prompts, plus any extra routing prompts, become the router's examples for the domain."""
    validate_expert_name(name)
    with sessions() as session:
        repo.require_new_expert(session, name)
    examples = load_examples(data, min_records=MIN_EXAMPLES)
    extra_train, extra_val = split_texts(load_texts(prompts)) if prompts is not None else ([], [])
    train, val = split_examples(examples)
    config = config or TrainConfig()
    final_dir = settings.experts_dir / name / "v1"
    staging = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=settings.experts_dir))
    try:
        with mlflow_run(settings, run_name=f"expert:{name}", tags={"kind": "train_expert"}) as run:
            result = train_adapter(settings, backbone, name, train, val, staging, config, on_progress=on_progress)
            result.run_id = run.info.run_id
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(final_dir, ignore_errors=True)
        staging.rename(final_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.adapter_path = str(final_dir)
    with sessions.begin() as session:
        result.version = register_expert(
            session, name=name, description=description, adapter_path=str(final_dir), backbone=backbone,
            rank=settings.lora_rank, target_modules=list(settings.lora_target_modules),
            metrics={"eval_loss_base": result.base_loss, "eval_loss_expert": result.expert_loss}, source="data",
            routing_train=[e.routing_text for e in train] + extra_train,
            routing_val=[e.routing_text for e in val] + extra_val, run_id=result.run_id,
            status=ExpertStatus.UNROUTED,
        )
    return result
