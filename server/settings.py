"""The server's configuration: one typed tree, read from a YAML file, overridden by the environment.

Precedence, highest first: keyword arguments (the CLI's --host/--port), environment variables
`GEMMA_SERVER_<SECTION>__<FIELD>` (e.g. `GEMMA_SERVER_ENGINE__MAX_MODEL_LEN=4096`), the YAML file,
then the defaults below. Every field is documented here; the README's configuration reference is
generated from the same descriptions.

This module imports neither vLLM nor FastAPI: it is read by the CLI, the app factory and the tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

ENV_PREFIX = "GEMMA_SERVER_"
CONFIG_ENV_VAR = "GEMMA_SERVER_CONFIG"
DEFAULT_TINY_MODEL_DIR = "~/.cache/gemma-server/tiny-gemma3"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Section):
    path: str = Field(
        DEFAULT_TINY_MODEL_DIR,
        description="Hugging Face model id (e.g. google/gemma-3-4b-it) or a local checkpoint folder.",
    )
    served_name: str = Field("gemma-3-4b-it", description="The model id clients send and /v1/models lists.")
    build_tiny_if_missing: bool = Field(
        False,
        description="Generate the tiny random-weight Gemma 3 at `path` if it is not there yet "
        "(development and CI only).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    aliases: dict[str, str] = Field(
        {},
        description="Other model names clients may send, each mapped to `served_name` (e.g. the Claude "
        'model names Claude Code asks for: {"claude-sonnet-4-5": "gemma-3-4b-it"}). Every route, every protocol.',
    )
    accept_any_name: bool = Field(
        False,
        description="Serve a request for any model name with the served model. Off: a name that is neither "
        "`served_name` nor an alias gets 404 (model_not_found / not_found_error).",
    )

    @model_validator(mode="after")
    def _aliases_name_the_served_model(self) -> ModelSettings:
        wrong = sorted(alias for alias, target in self.aliases.items() if target != self.served_name)
        if wrong:
            raise ValueError(f"model.aliases {wrong} must map to model.served_name ({self.served_name!r})")
        return self

    @property
    def resolved_path(self) -> str:
        """A local folder with `~` expanded; a hub id is returned as it is."""
        expanded = os.path.expanduser(self.path)
        if expanded != self.path or Path(expanded).exists() or self.build_tiny_if_missing:
            return str(Path(expanded).resolve())
        return self.path


class EngineSettings(_Section):
    dtype: Literal["bfloat16", "float32", "auto"] = Field(
        "bfloat16",
        description="Weights and activations. Gemma 3 needs bf16 or fp32: fp16 overflows and "
        "produces empty or garbage text, so it is refused.",
    )
    max_model_len: int = Field(131072, ge=256, description="Context length: prompt plus generated tokens.")
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1, description="Fraction of accelerator memory vLLM may use.")
    kv_cache_memory_bytes: int | None = Field(
        None,
        gt=0,
        description="KV cache size in bytes; overrides gpu_memory_utilization (set it on CPU).",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one replica shards across.")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages (multi-node).")
    nodes: int = Field(
        1,
        ge=1,
        description="Nodes one replica spans (vLLM multi-node: a Ray cluster, e.g. a LeaderWorkerSet group). "
        "Above 1 it needs distributed_executor_backend ray, and the tensor_parallel_size x "
        "pipeline_parallel_size GPUs must split evenly over the nodes.",
    )
    distributed_executor_backend: Literal["auto", "mp", "ray", "uni"] = Field(
        "auto",
        description="How vLLM runs its GPU workers: mp (processes on this node), ray (a Ray cluster, "
        "across nodes), uni (one worker in the engine process); auto lets vLLM choose.",
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prefixes.")
    max_num_seqs: int = Field(256, ge=1, description="Sequences the engine batches at once.")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="Token budget per engine step (chunked prefill)."
    )
    enforce_eager: bool = Field(False, description="Skip CUDA graphs / compilation.")
    constrained_json_whitespace: bool = Field(
        False,
        description="Let constrained JSON (response_format, tool calls) contain free whitespace. Off: compact "
        "JSON, which keeps models from filling their budget with blank lines.",
    )
    seed: int = Field(0, description="Engine seed for reproducible sampling.")
    extra_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Further vLLM AsyncEngineArgs, passed through as they are.",
    )

    @model_validator(mode="after")
    def _check_parallelism(self) -> EngineSettings:
        gpus = self.tensor_parallel_size * self.pipeline_parallel_size
        if self.nodes > 1 and self.distributed_executor_backend != "ray":
            raise ValueError(
                f"engine.nodes is {self.nodes}: a replica across nodes needs engine.distributed_executor_backend: "
                f"ray (is {self.distributed_executor_backend!r})"
            )
        if gpus % self.nodes:
            raise ValueError(
                f"engine.tensor_parallel_size x pipeline_parallel_size is {gpus} GPUs, which do not split "
                f"evenly over engine.nodes ({self.nodes})"
            )
        if self.distributed_executor_backend == "uni" and gpus > 1:
            raise ValueError(
                f"engine.distributed_executor_backend uni runs one worker, but tensor_parallel_size x "
                f"pipeline_parallel_size asks for {gpus}"
            )
        return self

    @field_validator("dtype", mode="before")
    @classmethod
    def _refuse_fp16(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in _FP16_NAMES:
            raise ValueError(_FP16_REFUSAL)
        return value

    @field_validator("extra_args")
    @classmethod
    def _no_fp16_through_extra_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        dtype = value.get("dtype")
        if isinstance(dtype, str) and dtype.lower() in _FP16_NAMES:
            raise ValueError(_FP16_REFUSAL)
        return value


_FP16_NAMES = {"float16", "fp16", "half", "torch.float16"}
_FP16_REFUSAL = (
    "Gemma 3 must not run in float16: its activations overflow fp16 and the model "
    "returns empty or garbage text (vLLM #14817). Use bfloat16 (or float32)."
)


class ImageSettings(_Section):
    max_per_request: int = Field(8, ge=0, description="Images allowed in one request (and in one engine prompt).")
    max_bytes: int = Field(20 * 2**20, ge=1, description="Largest encoded image, fetched or inline, in bytes.")
    max_pixels: int = Field(
        50_000_000, ge=1, description="Largest decoded image (width x height), checked before decoding."
    )
    fetch_timeout_seconds: float = Field(10.0, gt=0, description="Total time allowed to fetch one image URL.")
    fetch_connect_timeout_seconds: float = Field(
        5.0, gt=0, description="Time allowed to resolve and connect to an image host (each redirect hop)."
    )
    fetch_read_timeout_seconds: float = Field(
        5.0, gt=0, description="Longest silence allowed between two reads from an image host."
    )
    max_redirects: int = Field(3, ge=0, le=10, description="Redirect hops followed when fetching an image URL.")
    max_concurrent_fetches: int = Field(
        16, ge=1, description="Image URLs fetched at once by the whole server; further fetches wait."
    )
    max_concurrent_decodes: int = Field(
        4, ge=1, description="Images decoded at once (each may take max_pixels x 3 bytes); further decodes wait."
    )
    allowed_domains: list[str] = Field(
        default_factory=list,
        description="If set, image URLs may only name these hosts (example.com, or *.example.com for its "
        "subdomains), on every redirect hop. Empty: any public host.",
    )
    allow_private_networks: bool = Field(
        False,
        description="Let image URLs reach loopback/private addresses (development and tests only).",
    )
    private_network_allowlist: list[str] = Field(
        default_factory=list,
        description="Private destinations image URLs may still reach: CIDRs (10.1.0.0/16) or "
        "address:port pairs (127.0.0.1:9000), e.g. an internal image store.",
    )
    pan_and_scan: bool = Field(
        False,
        description="Gemma 3's pan-and-scan for images sent with detail high or auto (the default detail): "
        "large or elongated images get extra crops, each its own image tokens. detail low is always one view.",
    )
    pan_and_scan_max_crops: int = Field(
        4,
        ge=2,
        le=16,
        description="Most pan-and-scan crops per image (each costs as many tokens as the image itself).",
    )


class ServerSettings(_Section):
    host: str = Field("0.0.0.0", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")
    log_format: Literal["text", "json"] = Field("text", description="json for log collectors.")
    default_max_tokens: int | None = Field(
        None,
        ge=1,
        description="max_tokens when a request sets none (None: the rest of the context).",
    )
    max_tokens_cap: int | None = Field(
        None,
        ge=1,
        description="Most completion tokens one request may get: a larger max_tokens is clamped to it "
        "(the answer then ends with finish_reason length / stop_reason max_tokens). None: no cap beyond "
        "the context.",
    )
    engine_startup_timeout_seconds: float = Field(
        1800, gt=0, description="Give up (and exit non-zero) if the engine is not up by then."
    )
    drain_timeout_seconds: float = Field(
        30,
        ge=0,
        description="On SIGTERM: readiness fails at once, new work is refused, in-flight requests get "
        "this long to finish, then the rest are aborted and the process exits 0. Keep it below the "
        "orchestrator's grace period.",
    )
    max_body_bytes: int = Field(
        64 * 2**20, ge=1024, description="Largest request body; larger ones get 413 before being read."
    )
    strict_messages: bool = Field(
        False,
        description="Refuse (400) chat messages that do not fit Gemma 3's format instead of repairing them "
        "(merging consecutive turns, moving or merging system messages, inserting a first user turn).",
    )
    max_header_bytes: int = Field(
        64 * 2**10,
        ge=4096,
        description="Largest request head (request line and all headers); larger ones get 431 and the "
        "connection is closed before the rest is buffered.",
    )
    max_header_count: int = Field(100, ge=16, description="Most header fields in one request; more get 431.")
    stream_interval: int = Field(
        1,
        ge=1,
        le=64,
        description="Streamed answers, every protocol: up to this many generated tokens per event (vLLM's "
        "--stream-interval, applied per request). The first token is sent at once and the last with the "
        "finish, so time-to-first-token and the text, usage and finish reason are unchanged; fewer events "
        "cut the API process's CPU per token. 1: one event per token.",
    )
    api_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="HTTP/API processes sharing one engine core (vLLM's multi-API-server model): each has "
        "its own event loop, image decoding, tokenizer and detokenizer, so front-end CPU work scales "
        "with cores. The admission bounds are over all of them. "
        "1: one process, engine in it.",
    )


class AdmissionSettings(_Section):
    max_in_flight: int = Field(
        64, ge=1, description="Generation requests handed to the engine at once (running or queued there)."
    )
    max_waiting: int = Field(
        256, ge=0, description="Requests allowed to wait in the front end for a slot; beyond it, 429."
    )
    max_waiting_prompt_tokens: int = Field(
        2_000_000, ge=1, description="Prompt tokens allowed to wait in the front end; beyond it, 429."
    )
    retry_after_seconds: int = Field(1, ge=0, description="Retry-After sent with 429 and 503.")


class LoraAdapterSettings(_Section):
    name: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
        description="The model name clients send to use this adapter; /v1/models lists it.",
    )
    path: str = Field(
        min_length=1,
        description="A local PEFT adapter folder (adapter_config.json + adapter_model.safetensors); `~` is "
        "expanded. On GPU configs with hub access, a Hugging Face adapter id is also accepted.",
    )

    @property
    def resolved_path(self) -> str:
        """A local folder with `~` expanded and made absolute; a hub id is returned as it is."""
        expanded = os.path.expanduser(self.path)
        if expanded.startswith(("/", ".")) or Path(expanded).exists():
            return str(Path(expanded).resolve())
        return self.path


class LoraSettings(_Section):
    adapters: list[LoraAdapterSettings] = Field(
        default_factory=list,
        description="LoRA adapters of the model, loaded at start-up; each served under its `name` on every "
        'route (e.g. [{"name": "sql-expert", "path": "/adapters/sql-expert"}]).',
    )
    max_loras: int = Field(4, ge=1, description="Adapters one batch may mix (vLLM's max_loras).")
    max_lora_rank: int = Field(
        16, ge=1, le=512, description="Largest adapter rank accepted; vLLM sizes its LoRA buffers for it."
    )
    max_cpu_loras: int | None = Field(
        None, ge=1, description="Adapters kept in host memory for quick swap-in (vLLM's max_cpu_loras)."
    )
    runtime_loading: bool = Field(
        False,
        description="Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (admin keys only). "
        "Needs auth with an admin key and one API process.",
    )

    @property
    def enabled(self) -> bool:
        """The engine starts with LoRA only when there is something to serve with it."""
        return bool(self.adapters) or self.runtime_loading

    @model_validator(mode="after")
    def _names_unique(self) -> LoraSettings:
        names = [adapter.name for adapter in self.adapters]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"lora.adapters names {repeated} appear more than once")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("lora.max_cpu_loras must be at least lora.max_loras")
        return self


SHA256_HEX = r"^[0-9a-f]{64}$"


class ApiKeySettings(_Section):
    """One API key with what it may do. Give `sha256` (the hex SHA-256 of the key, so the key itself is
    not in the configuration: `gemma-server hash-key`) or `key`."""

    key: str | None = Field(None, min_length=8, description="The key itself (prefer `sha256`).")
    sha256: str | None = Field(None, pattern=SHA256_HEX, description="Hex SHA-256 of the key.")
    models: list[str] | None = Field(
        None,
        description="Model and adapter names this key sees and may use; others are 404 to it, as if they "
        "did not exist. Omitted: every name.",
    )
    admin: bool = Field(False, description="May load and unload LoRA adapters at runtime.")

    @model_validator(mode="after")
    def _one_form(self) -> ApiKeySettings:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("an auth.keys entry needs exactly one of `key` or `sha256`")
        return self


class AuthSettings(_Section):
    api_keys: list[str] = Field(
        default_factory=list,
        description="Accepted API keys (Authorization: Bearer <key>), each seeing every model. Empty, no "
        "file and no `keys`: no auth.",
    )
    keys: list[ApiKeySettings] = Field(
        default_factory=list,
        description='Keys with scopes: [{"sha256": "<hex>", "models": ["sql-expert"]}, {"sha256": "<hex>", '
        '"admin": true}].',
    )
    api_keys_file: str | None = Field(
        None, description="A file with one API key per line (e.g. a mounted Kubernetes Secret)."
    )
    metrics_public: bool = Field(True, description="Serve /metrics without a key (for Prometheus).")
    cors_allow_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS; empty turns CORS off."
    )


class ResponsesStoreSettings(_Section):
    url: str = Field(
        "sqlite:///~/.cache/gemma-server/responses.db",
        description="Where stored Responses (/v1/responses with store: true) live. sqlite:///path (a file "
        "shared by the API processes of one machine; `~` is expanded, sqlite:////abs/path is absolute) or "
        "postgresql://user:password@host:port/db (one database for several replicas).",
    )
    retention_seconds: float = Field(
        30 * 24 * 3600, gt=0, description="Stored responses older than this are deleted (default 30 days)."
    )
    max_bytes: int = Field(
        2**30,
        ge=2**20,
        description="Cap on the stored size (response JSON plus each image once); beyond it the oldest "
        "responses are deleted first.",
    )
    background_lease_seconds: float = Field(
        120.0,
        ge=5,
        description="The API process running a background response renews its lease every quarter of "
        "this; one whose lease lapses (its process died) reads failed. Longer than the worst stall of "
        "the machine, or a live response may be failed while its process is frozen.",
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("responses.url must start with sqlite:/// or postgresql://")
        return value


class Settings(BaseSettings):
    """The whole configuration. Build it with `load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        yaml_file=None,
    )

    model: ModelSettings = Field(default_factory=ModelSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    responses: ResponsesStoreSettings = Field(default_factory=ResponsesStoreSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.server.default_max_tokens and self.server.default_max_tokens >= self.engine.max_model_len:
            raise ValueError("server.default_max_tokens must be below engine.max_model_len")
        self._check_lora()
        return self

    def _check_lora(self) -> None:
        taken = {self.model.served_name, *self.model.aliases}
        clashing = sorted(adapter.name for adapter in self.lora.adapters if adapter.name in taken)
        if clashing:
            raise ValueError(f"lora.adapters names {clashing} are already the served model's name or an alias")
        if self.lora.runtime_loading:
            if not any(key.admin for key in self.auth.keys):
                raise ValueError("lora.runtime_loading needs an admin key (auth.keys entry with admin: true)")
            if self.server.api_processes > 1:
                # Each API process keeps its own table of adapter names; one loaded through one process
                # would be unknown to the others.
                raise ValueError("lora.runtime_loading needs server.api_processes: 1")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_path = _CONFIG_FILE_FOR_LOAD.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_path))
        return tuple(sources)


# pydantic-settings builds sources from class-level configuration; this hands the chosen file to
# `settings_customise_sources` for the duration of one `load_settings` call.
_CONFIG_FILE_FOR_LOAD: dict[str, Path | None] = {}


def load_settings(config_path: str | Path | None = None, **overrides: Any) -> Settings:
    """Reads the YAML file (or $GEMMA_SERVER_CONFIG), then the environment, then `overrides`.

    `overrides` are nested dicts by section, e.g. `server={"port": 9000}`.
    """
    path = config_path or os.environ.get(CONFIG_ENV_VAR)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
    _CONFIG_FILE_FOR_LOAD["path"] = path
    try:
        return Settings(**overrides)
    finally:
        _CONFIG_FILE_FOR_LOAD.pop("path", None)
