"""The vLLM engine adapter: the module that talks to vLLM's engine (`api_processes.py` only launches it).

It owns the engine's lifetime (`VllmEngine.start` / `shutdown`), turns our plain `SamplingOptions`
into vLLM's `SamplingParams`, runs vLLM's multimodal processor on a rendered prompt (so vLLM expands
Gemma 3's image tokens, off the event loop), streams `RequestOutput`s back as `EngineStep`s, and
translates vLLM's exceptions into the errors of `server/errors.py`.

vLLM does paged KV cache, continuous batching and tensor/pipeline parallelism; this module just
configures it from `EngineSettings`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from vllm import SamplingParams
from vllm.config import StructuredOutputsConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError, VLLMValidationError
from vllm.inputs import TokensPrompt
from vllm.logprobs import Logprob
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from server.engine.interface import (
    ChoiceDelta,
    EnginePrompt,
    EngineStep,
    LoraAdapter,
    PreparedPrompt,
    SamplingOptions,
    TokenLogprob,
)
from server.errors import BadRequestError, EngineError, ServiceUnavailableError
from server.settings import Settings

log = logging.getLogger(__name__)

# vLLM's own metrics; the engine records them into prometheus_client's default registry.
ENGINE_STATS_LOG_INTERVAL_SECONDS = 10.0


def device_problem() -> str | None:
    """Why vLLM has no device to run on here, in one line, or None when it has one.

    The CUDA build of vLLM on a machine (or in a container) that sees no GPU detects no platform at
    all, and its engine would then fail deep in start-up with a long traceback; the server says so
    before it starts anything. The CPU build always has its device."""
    from vllm.platforms import current_platform

    if not current_platform.is_unspecified():
        return None
    return (
        "vLLM sees no GPU on this machine (the CUDA build is installed): give the container a GPU "
        "(docker run --gpus all, or an nvidia.com/gpu resource on Kubernetes) and check nvidia-smi, "
        "or serve on the CPU with the CPU build (the cpu image, or uv sync --extra cpu)"
    )


def engine_args_from_settings(settings: Settings) -> AsyncEngineArgs:
    engine = settings.engine
    args: dict[str, Any] = {
        "model": settings.model.resolved_path,
        "served_model_name": settings.model.served_name,
        "revision": settings.model.revision,
        "dtype": engine.dtype,
        "max_model_len": engine.max_model_len,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "kv_cache_memory_bytes": engine.kv_cache_memory_bytes,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "pipeline_parallel_size": engine.pipeline_parallel_size,
        "enable_prefix_caching": engine.enable_prefix_caching,
        "max_num_seqs": engine.max_num_seqs,
        "max_num_batched_tokens": engine.max_num_batched_tokens,
        "enforce_eager": engine.enforce_eager,
        "seed": engine.seed,
        "limit_mm_per_prompt": {"image": settings.images.max_per_request},
        # xgrammar: the backend that can keep constrained JSON compact (vLLM allows no "auto" with it).
        "structured_outputs_config": StructuredOutputsConfig(
            backend="xgrammar", disable_any_whitespace=not engine.constrained_json_whitespace
        ),
        "disable_log_stats": False,  # keeps the vllm:* Prometheus metrics
        "enable_log_requests": False,
    }
    if engine.distributed_executor_backend != "auto":
        args["distributed_executor_backend"] = engine.distributed_executor_backend
    lora = settings.lora
    if lora.enabled:  # LoRA costs memory and a little compute per step: only when there are adapters
        args.update(enable_lora=True, max_loras=lora.max_loras, max_lora_rank=lora.max_lora_rank)
        if lora.max_cpu_loras is not None:
            args["max_cpu_loras"] = lora.max_cpu_loras
    args.update(engine.extra_args)
    return AsyncEngineArgs(**args)


def _attach_to_shared_core(args: AsyncEngineArgs, shared_core: dict[str, Any]) -> AsyncLLM:
    """An AsyncLLM that is client `client_index` of `client_count` of an engine core started elsewhere."""
    count, index = shared_core["client_count"], shared_core["client_index"]
    args._api_process_count = count
    args._api_process_rank = index
    vllm_config = args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    addresses = {key: value for key, value in shared_core.items() if key not in ("client_count", "client_index")}
    return AsyncLLM.from_vllm_config(
        vllm_config=vllm_config,
        usage_context=UsageContext.OPENAI_API_SERVER,
        enable_log_requests=False,
        disable_log_stats=args.disable_log_stats,
        client_addresses=addresses,
        client_count=count,
        client_index=index,
    )


class VllmEngine:
    """Implements `server.engine.interface.EngineClient` on vLLM's `AsyncLLM`."""

    def __init__(self, settings: Settings, shared_core: dict[str, Any] | None = None) -> None:
        """`shared_core`: in an API process of `server.api_processes`, the addresses of the engine
        core its parent started (vLLM's client config: ZMQ addresses, `client_index`,
        `client_count`); this process's AsyncLLM then attaches to it instead of spawning one."""
        self.settings = settings
        self._shared_core = shared_core
        self.model_name = settings.model.served_name
        self.max_model_len = settings.engine.max_model_len
        self._llm: AsyncLLM | None = None
        self._defaults: dict[str, Any] = {}
        self._stats_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._active: set[str] = set()  # request ids being generated, for abort_all

    # ---- lifetime -------------------------------------------------------------------------

    async def start(self) -> None:
        """Builds the engine (spawns the engine-core process, loads weights, warms up).

        Construction blocks for a minute or more, so it runs in a worker thread: the HTTP server
        keeps answering /health (alive) and /ready (503) meanwhile.
        """
        args = engine_args_from_settings(self.settings)
        started = time.monotonic()
        if self._shared_core is None:
            llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        else:
            llm = await asyncio.to_thread(_attach_to_shared_core, args, self._shared_core)
        self._llm = llm
        self.max_model_len = llm.model_config.max_model_len
        self._defaults = llm.model_config.get_diff_sampling_param()
        if self._shared_core is None or self._shared_core["client_index"] == 0:
            # One periodic engine-stats log line per engine, not one per API process.
            self._stats_task = asyncio.create_task(self._log_stats_periodically())
        log.info(
            "engine ready in %.1f s: model=%s max_model_len=%d defaults=%s",
            time.monotonic() - started,
            self.settings.model.resolved_path,
            self.max_model_len,
            self._defaults,
        )

    def engine_core_died(self) -> bool:
        """The shared engine core has gone (its parent said so): fail like a local engine's death.

        vLLM watches the engine core only when it spawned it; an API process attached to a shared
        core would wait for outputs forever. This does what vLLM's own monitor does: the client is
        marked dead and shut down, so every open request ends with `EngineDeadError`. False if
        there was no running engine to fail (not attached yet, or shutting down)."""
        if self._llm is None or self._stopping:
            return False
        log.error("the shared engine core has died")
        self._llm.engine_core.resources.engine_dead = True
        self._llm.engine_core.shutdown()
        return True

    def shutdown(self) -> None:
        self._stopping = True
        if self._stats_task is not None:
            self._stats_task.cancel()
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    async def _log_stats_periodically(self) -> None:
        while self._llm is not None:
            await asyncio.sleep(ENGINE_STATS_LOG_INTERVAL_SECONDS)
            if self._llm is not None:
                await self._llm.do_log_stats()

    @property
    def is_ready(self) -> bool:
        return self._llm is not None and not self._llm.errored

    @property
    def is_dead(self) -> bool:
        """True once a started engine has failed (not while it is still loading)."""
        return self._llm is not None and self._llm.errored and not self._stopping

    @property
    def tokenizer(self) -> Any:
        return self._require().get_tokenizer()

    def default_sampling(self) -> dict[str, Any]:
        """The checkpoint's generation_config defaults (Gemma 3: top_k 64, top_p 0.95)."""
        return dict(self._defaults)

    def _require(self) -> AsyncLLM:
        if self._llm is None:
            raise ServiceUnavailableError("the model is still loading; retry shortly")
        if self._llm.errored and not self._stopping:
            raise ServiceUnavailableError("the inference engine has stopped; the server is restarting")
        return self._llm

    # ---- requests -------------------------------------------------------------------------

    async def prepare(self, prompt: EnginePrompt) -> PreparedPrompt:
        """Runs vLLM's multimodal processor: images resized and normalized, image tokens expanded.

        vLLM runs the processor in its own worker thread, so the event loop stays free.
        """
        llm = self._require()
        tokens_prompt = TokensPrompt(prompt_token_ids=prompt.token_ids)
        if prompt.images:
            tokens_prompt["multi_modal_data"] = {"image": list(prompt.images)}
            if prompt.image_ids is not None:
                tokens_prompt["multi_modal_uuids"] = {"image": list(prompt.image_ids)}
            if prompt.mm_processor_kwargs:
                tokens_prompt["mm_processor_kwargs"] = dict(prompt.mm_processor_kwargs)
        try:
            engine_input = await llm.renderer.process_for_engine_async(tokens_prompt, arrival_time=time.time())
        except (ValueError, TypeError, VLLMClientError) as exc:
            what = "the images" if prompt.images else "the prompt"
            raise BadRequestError(f"{what} could not be processed: {exc}", param="messages") from exc
        fields = cast(dict[str, Any], engine_input)
        token_ids = list(fields["prompt_token_ids"])
        placeholders = fields.get("mm_placeholders") or {}
        num_image_tokens = sum(p.length for p in placeholders.get("image", ()))
        return PreparedPrompt(token_ids=token_ids, num_image_tokens=num_image_tokens, engine_input=engine_input)

    async def generate(
        self, prompt: PreparedPrompt, options: SamplingOptions, request_id: str, adapter: LoraAdapter | None = None
    ) -> AsyncIterator[EngineStep]:
        llm = self._require()
        params = self._sampling_params(options)
        want_logprobs = options.logprobs is not None
        want_prompt_logprobs = options.prompt_logprobs is not None
        lora_request = _lora_request(adapter) if adapter is not None else None
        self._active.add(request_id)
        try:
            async for output in llm.generate(prompt.engine_input, params, request_id, lora_request=lora_request):
                step = _step_from_output(output, want_logprobs=want_logprobs, want_prompt_logprobs=want_prompt_logprobs)
                want_prompt_logprobs = False  # they come with the first output only
                if any(choice.finish_reason == "abort" for choice in step.choices):
                    # Only `abort_all` (the end of a drain) aborts from outside; a client that goes
                    # away cancels the generator instead and never sees this.
                    raise ServiceUnavailableError(
                        "the server stopped this request while shutting down; retry on another replica",
                        code="server_shutting_down",
                    )
                yield step
        except EngineDeadError as exc:
            raise ServiceUnavailableError("the inference engine has stopped") from exc
        except VLLMClientError as exc:
            raise _bad_request(exc) from exc
        except EngineGenerateError as exc:
            cause = exc.__cause__
            if isinstance(cause, (ValueError, VLLMClientError)):
                raise _bad_request(cause) from exc
            raise EngineError("the engine failed to generate a response") from exc
        finally:
            self._active.discard(request_id)

    async def add_adapter(self, adapter: LoraAdapter) -> None:
        llm = self._require()
        try:
            await llm.add_lora(_lora_request(adapter))
        except EngineDeadError as exc:
            raise ServiceUnavailableError("the inference engine has stopped") from exc
        except Exception as exc:
            # vLLM raises a bare Exception ("Call to add_lora method failed: Worker failed with error
            # 'LoRA rank 16 is greater than max_lora_rank 8.'") and stays up: only the adapter is refused.
            if llm.errored:
                raise ServiceUnavailableError("the inference engine has stopped") from exc
            raise BadRequestError(
                f"the engine could not load adapter '{adapter.name}': {_worker_error(exc)}",
                param="lora_path",
                code="adapter_invalid",
            ) from exc

    async def remove_adapter(self, adapter: LoraAdapter) -> None:
        if self._llm is not None and not self._llm.errored:
            await self._llm.remove_lora(adapter.lora_id)

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def abort_all(self) -> int:
        """Aborts every request being generated; their generators then raise ServiceUnavailableError."""
        request_ids = list(self._active)
        if self._llm is not None and request_ids and not self._llm.errored:
            await self._llm.abort(request_ids)
        return len(request_ids)

    def _sampling_params(self, options: SamplingOptions) -> SamplingParams:
        defaults = self._defaults

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(options, name)
            if value is not None:
                return value
            return defaults.get(name, fallback)

        structured = None
        if options.json_schema is not None:
            structured = StructuredOutputsParams(json=options.json_schema)
        elif options.json_object:
            structured = StructuredOutputsParams(json_object=True)
        elif options.regex is not None:
            structured = StructuredOutputsParams(regex=options.regex)
        elif options.structural_tag is not None:
            structured = StructuredOutputsParams(structural_tag=options.structural_tag)

        try:
            return SamplingParams(
                n=options.n,
                temperature=pick("temperature", 1.0),
                top_p=pick("top_p", 1.0),
                top_k=pick("top_k", 0),
                min_p=pick("min_p", 0.0),
                presence_penalty=pick("presence_penalty", 0.0),
                frequency_penalty=pick("frequency_penalty", 0.0),
                repetition_penalty=pick("repetition_penalty", 1.0),
                seed=options.seed,
                stop=list(options.stop),
                stop_token_ids=list(options.stop_token_ids),
                ignore_eos=options.ignore_eos,
                max_tokens=options.max_tokens,
                min_tokens=options.min_tokens,
                logprobs=options.logprobs,
                prompt_logprobs=options.prompt_logprobs,
                logit_bias=options.logit_bias,
                skip_special_tokens=options.skip_special_tokens,
                include_stop_str_in_output=options.include_stop_str_in_output,
                structured_outputs=structured,
                output_kind=RequestOutputKind.DELTA if options.stream else RequestOutputKind.FINAL_ONLY,
                # vLLM sends a delta every `stream_interval` tokens (the first at once); the
                # protocols' streams take deltas of any length, so every protocol coalesces alike.
                stream_interval=self.settings.server.stream_interval if options.stream else None,
            )
        except (ValueError, TypeError, VLLMClientError) as exc:
            raise _bad_request(exc) from exc


def _worker_error(exc: Exception) -> str:
    """The worker's own message out of vLLM's wrapper text, when it is there."""
    found = re.search(r"Worker failed with error '(.*)', please check", str(exc), re.DOTALL)
    return found.group(1) if found else str(exc)


def _lora_request(adapter: LoraAdapter) -> LoRARequest:
    return LoRARequest(lora_name=adapter.name, lora_int_id=adapter.lora_id, lora_path=adapter.path)


def _bad_request(exc: BaseException) -> BadRequestError:
    """A request error from vLLM, naming the parameter when vLLM says which one it was."""
    param = exc.parameter if isinstance(exc, VLLMValidationError) else None
    message = exc.args[0] if isinstance(exc, VLLMValidationError) and exc.args else str(exc)
    return BadRequestError(_LOG_PREFIX.sub("", str(message)), param=param)


# xgrammar puts "[12:34:56] /path/file.cc:123: " in front of its messages.
_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


def _step_from_output(output: RequestOutput, *, want_logprobs: bool, want_prompt_logprobs: bool = False) -> EngineStep:
    choices = [
        ChoiceDelta(
            index=completion.index,
            text=completion.text,
            token_ids=list(completion.token_ids),
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
            logprobs=_logprobs(completion.token_ids, completion.logprobs) if want_logprobs else None,
        )
        for completion in output.outputs
    ]
    return EngineStep(
        choices=choices,
        finished=output.finished,
        prompt_token_ids=output.prompt_token_ids,
        num_cached_tokens=output.num_cached_tokens or 0,
        prompt_logprobs=_prompt_logprobs(output) if want_prompt_logprobs else None,
    )


def _prompt_logprobs(output: RequestOutput) -> list[TokenLogprob | None] | None:
    if output.prompt_logprobs is None or output.prompt_token_ids is None:
        return None
    first, *rest = output.prompt_logprobs
    scored = _logprobs(output.prompt_token_ids[1:], rest) or []
    return [None, *scored] if first is None else [*(_logprobs(output.prompt_token_ids[:1], [first]) or []), *scored]


def _logprobs(token_ids: Any, logprobs: Any) -> list[TokenLogprob] | None:
    if logprobs is None:
        return None
    result: list[TokenLogprob] = []
    for token_id, candidates in zip(token_ids, logprobs, strict=False):
        chosen: Logprob | None = candidates.get(token_id)
        top = sorted(
            ((tid, lp.decoded_token or "", lp.logprob) for tid, lp in candidates.items()),
            key=lambda item: -item[2],
        )
        result.append(
            TokenLogprob(
                token_id=token_id,
                token=(chosen.decoded_token or "") if chosen else "",
                logprob=chosen.logprob if chosen else float("-inf"),
                top=top,
            )
        )
    return result
